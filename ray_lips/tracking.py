"""Experiment trackers: MLflow, Weights & Biases and TensorBoard, for ``run``, ``compare`` and
``sweep`` alike.

What a tracker receives is the same everywhere: the run's config as flattened parameters
(``data.dataset``, ``lips.sparsity``, ...), every round's numbers with the round as the step,
the final summary, and the figures the command draws. Everything is logged from the command's
own process (the rows come back to it from the driver actors, or from Tune's trial results),
so the trackers need not be installed on the cluster's nodes. The ``track:`` section of a
config file is not part of the experiment: it never reaches the run's ``config.yaml``.

A tracker that fails while logging is reported once and dropped: the run goes on, and its
numbers never depend on a tracker.

A resumed run (``run --resume``, a resumed or retried sweep trial) continues the tracker runs it
started: each run folder keeps ``trackers.json``, the trackers' run ids and the last round
logged to them. The rounds a resume computes again (those after the last checkpoint) are the
same numbers and are not logged twice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from ray_lips.config import ConfigError

TRACKERS = ("mlflow", "wandb", "tensorboard")
# the module each tracker imports, and the extra that installs it
_MODULES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboardX"}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MlflowOptions(_Options):
    uri: str | None = None  # a tracking URI; default: the file store OUTPUT/mlruns
    experiment: str | None = None  # default: the config's name (a sweep: the sweep's name)


class WandbOptions(_Options):
    project: str = "ray-lips"
    entity: str | None = None
    # default: $WANDB_MODE, else online when logged in (W&B's key in $WANDB_API_KEY or
    # ~/.netrc), else offline (no network needed; upload later with ``wandb sync``)
    mode: Literal["online", "offline", "disabled"] | None = None
    dir: str | None = None  # default: $WANDB_DIR, else OUTPUT (W&B adds its wandb/ folder)


class TensorboardOptions(_Options):
    dir: str | None = None  # default: OUTPUT/tensorboard (one folder a run)


class TrackConfig(_Options):
    """The trackers a command logs to (none: ``None``) and their options."""

    mlflow: MlflowOptions | None = None
    wandb: WandbOptions | None = None
    tensorboard: TensorboardOptions | None = None

    @property
    def names(self) -> list[str]:
        return [name for name in TRACKERS if getattr(self, name) is not None]


def parse_track(raw: Any, where: str = "track") -> TrackConfig:
    """A ``track:`` section: a name, a comma-separated or YAML list of names, or a mapping of
    names to their options (``{}``, ``true`` or ``null`` for the defaults, ``false`` for off)."""
    if raw is None or raw is False:
        return TrackConfig()
    if isinstance(raw, str):
        raw = raw.split(",")
    if isinstance(raw, list):
        names = [str(name).strip() for name in raw if str(name).strip()]
        raw = dict.fromkeys(names, {})
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected tracker names ({', '.join(TRACKERS)}) or a "
                          f"mapping of them to their options, got {raw!r}")
    tree: dict[str, Any] = {}
    for name, options in raw.items():
        if name not in TRACKERS:
            raise ConfigError(f"{where}: unknown tracker {name!r}; expected one of "
                              f"{', '.join(TRACKERS)}")
        if options is False:
            continue
        tree[name] = {} if options is None or options is True else options
    try:
        return TrackConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{where}.{key}: {first['msg']}") from None


def choose(section: Any, names: Iterable[str] = (), uri: str | None = None) -> TrackConfig:
    """The config file's ``track:`` section with the command line's ``--track`` names added
    (``--track none``: no tracker at all) and ``--track-uri`` as MLflow's tracking URI."""
    track = parse_track(section)
    asked = [part.strip() for name in names for part in name.split(",") if part.strip()]
    if "none" in asked:
        if len(asked) > 1:
            raise ConfigError("--track none: turns every tracker off; give no other name")
        return TrackConfig()
    extra = parse_track(asked, "--track")
    track = track.model_copy(update={n: getattr(track, n) or getattr(extra, n)
                                     for n in extra.names})
    if uri is not None:
        track = track.model_copy(update={
            "mlflow": (track.mlflow or MlflowOptions()).model_copy(update={"uri": uri})})
    return track


def section_of(tree: Mapping[str, Any]) -> Any:
    """The ``track:`` section of a config tree (after its ``--set`` overrides)."""
    return tree.get("track")


class TrackerMissing(ConfigError):
    """A tracker was asked for whose package is not installed."""


def require_installed(track: TrackConfig) -> None:
    """Raise ``TrackerMissing`` naming the extra to install for the first missing tracker."""
    for name in track.names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise TrackerMissing(f"--track {name}: {_MODULES[name]} is not installed; "
                                 f"pip install 'ray-lips[{name}]'")


# ----- one run's trackers -------------------------------------------------------------------
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"data": {"alpha": 0.1}}`` -> ``{"data.alpha": "0.1"}``: a config as parameters."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def numbers(values: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The finite numbers of a row or summary (not flags, not NaN: a round not evaluated
    has no accuracy to plot)."""
    skipped = set(skip)
    return {k: float(v) for k, v in values.items()
            if k not in skipped and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)}


@dataclass
class RunInfo:
    """What names a run in the trackers, and where their local files go by default."""

    name: str  # the run folder's name (a sweep: the trial's)
    experiment: str  # the config's name (a sweep: the sweep's)
    params: dict[str, str]  # the config, flattened
    run_dir: Path
    base_dir: Path  # default home of the local stores: the output folder or the sweep's
    tags: dict[str, str] = field(default_factory=dict)


class Tracker(Protocol):
    run_id: str  # what continues it after a resume ("" where its folder is enough)

    def log_round(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_summary(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_figure(self, path: Path) -> None: ...
    def log_file(self, path: Path, folder: str) -> None: ...
    def close(self, failed: bool) -> None: ...


def mlflow_uri(options: MlflowOptions, base_dir: Path) -> str:
    return options.uri or (base_dir / "mlruns").resolve().as_uri()


class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (no global active run: several runs at once)."""

    def __init__(self, options: MlflowOptions, info: RunInfo, previous: str | None = None):
        uri = mlflow_uri(options, info.base_dir)
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses a file store unless asked; a local store is this default
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if previous is not None and self._continue(previous):
            return
        name = options.experiment or info.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name))
        run = self.client.create_run(experiment_id, run_name=info.name, tags={
            "ray_lips.run_dir": str(info.run_dir), **info.tags})
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in info.params.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _continue(self, run_id: str) -> bool:
        """Log on to the run ``run_id`` of this store, if it is there and not deleted."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.lifecycle_stage != "active":
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    log_round = _metrics
    log_summary = _metrics

    def log_figure(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def log_file(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def wandb_mode(options: WandbOptions) -> str:
    """The W&B mode a run uses: never one that waits on a login that is not there."""
    if options.mode is not None:
        return options.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        logged_in = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandbTracker:
    """A W&B run (``reinit="create_new"``: a compare's runs are open at once in one process);
    ``mode: offline`` (or ``WANDB_MODE=offline``) writes it to disk and needs no network."""

    def __init__(self, options: WandbOptions, info: RunInfo, previous: str | None = None):
        import wandb

        folder = options.dir or os.environ.get("WANDB_DIR") or str(info.base_dir)
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            project=options.project, entity=options.entity, mode=wandb_mode(options), dir=folder,
            name=info.name, group=info.experiment, config=info.params,
            tags=[f"{k}={v}"[:64] for k, v in info.tags.items()][:20],  # W&B's limits
            reinit="create_new",
            **({"id": previous, "resume": "allow"} if previous is not None else {}))
        self.run_id = self.run.id

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, step: int, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_figure(self, path: Path) -> None:
        self.run.log({f"figures/{path.stem}": self.wandb.Image(str(path))})

    def log_file(self, path: Path, folder: str) -> None:
        """A copy among the run's files (``folder/name``), uploaded with the run."""
        self.run.save(str(path), base_path=str(path.parents[len(Path(folder).parts)]),
                      policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TensorboardTracker:
    """An event file in ``DIR/<run name>``: scalars per round, ``final/*`` at the last round,
    the config as text, figures as images."""

    run_id = ""  # continued by writing to the same folder

    def __init__(self, options: TensorboardOptions, info: RunInfo, previous: str | None = None):
        from tensorboardX import SummaryWriter

        root = Path(options.dir).expanduser() if options.dir else info.base_dir / "tensorboard"
        self.logdir = root / info.name
        self.writer = SummaryWriter(logdir=str(self.logdir))
        if previous is None:  # a continued run has its config already
            table = "\n".join(f"| {k} | {v} |" for k, v in info.params.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)
        self.last_step = 0

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        self.last_step = step
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"final/{key}", value, step)

    def log_figure(self, path: Path) -> None:
        from matplotlib.image import imread

        self.writer.add_image(f"figures/{path.stem}", imread(str(path))[..., :3],
                              self.last_step, dataformats="HWC")

    def log_file(self, path: Path, folder: str) -> None:
        """Markdown as text (TensorBoard's text tab renders it); other files are not kept."""
        if path.suffix == ".md":
            self.writer.add_text("/".join(filter(None, (folder, path.stem))),
                                 path.read_text(), self.last_step)

    def close(self, failed: bool) -> None:
        self.writer.close()


_OPENERS = {"mlflow": MlflowTracker, "wandb": WandbTracker, "tensorboard": TensorboardTracker}


_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Logged:
    """What a run folder's ``trackers.json`` says: each tracker's run id (TensorBoard's is
    ``""``: its folder is named after the run) and the last round logged to them."""

    ids: dict[str, str]
    last_step: int | None = None


def read_logged(run_dir: Path) -> Logged:
    """``run_dir``'s ``trackers.json``; empty when it is missing, damaged or not a plain file
    (a link is never followed). Only known trackers with plain ids count: an id names a run,
    never a path."""
    from ray_lips.core.run_folder import TRACKERS_FILE

    try:
        fd = os.open(Path(run_dir) / TRACKERS_FILE,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return Logged({})
    with os.fdopen(fd, "rb") as handle:
        try:
            data = json.loads(handle.read(65536)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        except (OSError, ValueError):
            data = None
    if not isinstance(data, dict):
        return Logged({})
    ids = data.get("ids") if isinstance(data.get("ids"), dict) else {}
    ids = {name: run_id for name, run_id in ids.items() if name in TRACKERS
           and isinstance(run_id, str) and (run_id == "" or _RUN_ID.fullmatch(run_id))}
    last = data.get("last_step")
    valid = isinstance(last, int) and not isinstance(last, bool) and last >= 0
    return Logged(ids, last if valid else None)


def continued(run_dir: Path, uri: str | None = None) -> TrackConfig:
    """The trackers an interrupted run in ``run_dir`` logged to (default options; ``uri``:
    MLflow's tracking URI, where it was not the default)."""
    return choose(None, list(read_logged(run_dir).ids), uri)


class RunTrackers:
    """One run's open trackers. A tracker that fails is told once on stderr and dropped.

    In a run folder that has logged before (a resume), each tracker continues its run where
    it can (``trackers.json``) and skips the rounds already logged to it."""

    def __init__(self, track: TrackConfig, info: RunInfo, stream=sys.stderr):
        self.stream, self.info = stream, info
        self.trackers: dict[str, Tracker] = {}
        self.last_step = 0
        earlier = read_logged(info.run_dir)
        self.logged_through = earlier.last_step  # the continued trackers have these rounds
        self.continued: set[str] = set()
        for name in track.names:
            previous = earlier.ids.get(name)
            with self._guard(name, "could not start"):
                self.trackers[name] = _OPENERS[name](getattr(track, name), info, previous)
                if previous is not None and self.trackers[name].run_id == previous:
                    self.continued.add(name)
                    print(f"{name}: continuing the run of {info.name}"
                          + (f" ({previous})" if previous else ""), file=stream, flush=True)
        self._save()

    def _save(self) -> None:
        """``trackers.json``: the run ids and the last round logged (as well as the disk
        allows: a tracker never stops a run)."""
        from ray_lips.core.run_folder import TRACKERS_FILE, write_bytes_replacing

        if not self.trackers or not self.info.run_dir.is_dir():
            return
        last = max(self.last_step, self.logged_through or 0)
        data = {"ids": {name: t.run_id for name, t in self.trackers.items()}, "last_step": last}
        with contextlib.suppress(OSError):
            write_bytes_replacing(self.info.run_dir / TRACKERS_FILE, json.dumps(data).encode())

    @contextlib.contextmanager
    def _guard(self, name: str, what: str):
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a tracker never stops a run
            self.trackers.pop(name, None)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"warning: {name} {what} for {self.info.name}, no more logging to it: "
                  f"{first}", file=self.stream, flush=True)

    def _each(self, what: str, call: str, *args: Any, but: Iterable[str] = ()) -> None:
        for name, tracker in list(self.trackers.items()):
            if name not in but:
                with self._guard(name, what):
                    getattr(tracker, call)(*args)

    def log_round(self, row: Mapping[str, Any], skip: Iterable[str] = ()) -> None:
        """A round's row, its round (``round``) as the step; a continued tracker that has the
        round already (a resume computes it again, to the same numbers) is not sent it."""
        self.last_step = int(row.get("round", self.last_step))
        metrics = numbers(row, ("round", *skip))
        if metrics:
            seen = self.logged_through is not None and self.last_step <= self.logged_through
            self._each("failed", "log_round", self.last_step, metrics,
                       but=self.continued if seen else ())
            self._save()

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The final numbers (windowed and last accuracies, fine-tuning, seconds per round)."""
        metrics = numbers(summary)
        if metrics:
            self._each("failed", "log_summary", self.last_step, metrics)

    def log_figure(self, path: Path | None) -> None:
        if path is not None and Path(path).is_file():
            self._each("failed", "log_figure", Path(path))

    def log_file(self, path: Path, folder: str = "") -> None:
        self._each("failed", "log_file", Path(path), folder)

    def close(self, failed: bool = False) -> None:
        self._each("failed to close", "close", failed)
        self.trackers.clear()


def report_store(dirs: Iterable[Path]) -> Path:
    """Where a report's tracker files go by default: beside the runs' own (the first DIR, or
    its parent, that holds ``mlruns``: a sweep's folder, or a run's output folder), else the
    first DIR."""
    first = Path(next(iter(dirs))).resolve()
    for folder in (first, first.parent):
        if (folder / "mlruns").is_dir():
            return folder
    return first


def log_report(track: TrackConfig, report: Path, experiment: str, base_dir: Path,
               params: Mapping[str, str]) -> None:
    """A report (``report.md`` in its folder, with ``tables/`` and ``figures/``) as one
    tracker run named ``report-<folder above it>`` in ``experiment``: the figures as figures,
    every file as an artifact in the same folders. Reporting again logs on to the same run
    (the report folder's ``trackers.json``)."""
    folder = report.parent
    trackers = RunTrackers(track, RunInfo(
        name=f"report-{folder.parent.name}", experiment=experiment, params=dict(params),
        run_dir=folder, base_dir=base_dir, tags={"ray_lips.report": str(report)}))
    try:
        trackers.log_file(report)
        for sub in ("tables", "figures"):
            for path in sorted((folder / sub).glob("*")):
                if path.is_file() and not path.is_symlink():
                    trackers.log_file(path, sub)
                    if sub == "figures" and path.suffix == ".png":
                        trackers.log_figure(path)
    finally:
        trackers.close()


def run_info(cfg: Any, run_dir: Path, base_dir: Path | None = None, experiment: str | None = None,
             name: str | None = None, tags: Mapping[str, str] | None = None) -> RunInfo:
    """The ``RunInfo`` of an ``ExperimentConfig`` run in ``run_dir`` (default home of the
    local stores: the config's ``output`` folder)."""
    return RunInfo(
        name=name or run_dir.name, experiment=experiment or cfg.name,
        params=flatten(cfg.to_dict()), run_dir=run_dir,
        base_dir=Path(base_dir if base_dir is not None else cfg.output),
        tags={"method": cfg.method, "seed": str(cfg.seed), **(tags or {})})
