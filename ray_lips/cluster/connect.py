"""Connecting to Ray: an explicit local instance unless the user names a cluster."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import ray

from ray_lips.cluster.resources import ClusterError, RunNeed
from ray_lips.config import ExperimentConfig

__all__ = ["ClusterError", "check_cluster_auth", "check_resources", "connect"]


_IMPORT_WAIT_S = 300.0  # the most connect() waits for its background imports after Ray is up


def connect(address: str | None = None, num_cpus: int | None = None,
            while_starting: Sequence[str] = ()) -> str:
    """Join ``address`` (or $RAY_ADDRESS); otherwise start a private local Ray.

    A bare ``ray.init()`` would join whatever /tmp/ray/ray_current_cluster names, even a
    dead one, so the local case always asks for ``address="local"``. Token authentication stays
    on in both cases: the cluster's token is found where Ray looks for it ($RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) without the user exporting RAY_AUTH_MODE, and a
    cluster that refuses us ends in a one-line ``ClusterError`` within seconds
    (``check_cluster_auth``).

    ``while_starting``: modules to import in a background thread meanwhile. Most of Ray's
    start is waiting for its daemons, so torch and the engine load in that time (about 3 s
    of a 2-core machine's start-up; benchmarks/README.md).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "existing"
    if address:
        check_cluster_auth(address)
    elif AUTH_MODE_ENV not in os.environ:
        _use_token_auth()  # what Ray does for a new local Ray, without its opt-out banner
    importer = _import_in_background(while_starting)
    try:
        with _workers_ignore_working_dir():
            if address:
                _join(address)
                return address
            with _no_metrics_servers():
                ray.init(address="local", num_cpus=num_cpus, log_to_driver=True,
                         **PRIVATE_RAY_OPTIONS)
        return "local"
    finally:
        importer.join(timeout=_IMPORT_WAIT_S)


def _join(address: str) -> None:
    """``ray.init`` on a cluster; its connection and token errors as one-line ClusterErrors."""
    from ray.exceptions import AuthenticationError  # noqa: PLC0415

    try:
        ray.init(address=address, log_to_driver=True)
    except AuthenticationError as err:
        raise ClusterError(f"the Ray cluster at {address}: {err.message}; {_TOKEN_HINT}") from None
    except ConnectionError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ClusterError(f"cannot join the Ray cluster at {address} ({first}); check "
                           "--address or $RAY_ADDRESS and that `ray start --head` runs "
                           "there") from None


# ----- token authentication -------------------------------------------------------------------
AUTH_MODE_ENV = "RAY_AUTH_MODE"
_PROBE_TIMEOUT_S = 5.0  # one answer from the cluster's GCS
_REACH_TIMEOUT_S = 10.0  # retries while the GCS does not answer at all (a head still starting)
_TOKEN_HINT = ("copy the head node's ~/.ray/auth_token to ~/.ray/auth_token on this machine, "
               "or export RAY_AUTH_TOKEN=<token> (`ray get-auth-token` on the head prints it)")


def _use_token_auth() -> None:
    """Token authentication for this process and the Ray processes it starts: what Ray itself
    does on ``ray.init``, where it also logs that RAY_AUTH_MODE=disabled would opt out."""
    from ray._raylet import Config  # noqa: PLC0415 - Ray caches the mode: refresh it

    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")


def _token_source() -> str:
    """Where Ray reads the token from, in its own order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"$RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return str(Path.home() / ".ray" / "auth_token")


def _token_metadata() -> tuple[tuple[str, str], ...]:
    """The gRPC metadata that carries this machine's token; empty when it has none."""
    from ray._raylet import AuthenticationTokenLoader  # noqa: PLC0415
    from ray.exceptions import AuthenticationError  # noqa: PLC0415

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since Ray last looked
    try:
        return tuple(loader.get_token_for_http_header(ignore_auth_mode=True).items())
    except AuthenticationError as err:  # e.g. RAY_AUTH_TOKEN_PATH names a missing file
        raise ClusterError(f"{err.message}; {_TOKEN_HINT}") from None


def _gcs_address(address: str) -> str | None:
    """``host:port`` of a cluster's GCS, or None for addresses Ray resolves itself (``auto``,
    ``ray://`` clients)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return None
    return address


def _probe(gcs: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """Ask the GCS for its cluster id: ``ok``, ``refused`` (the token is missing or wrong),
    ``unreachable``, or ``unknown`` (an answer that says nothing about the token)."""
    import grpc  # noqa: PLC0415
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc  # noqa: PLC0415

    deadline = time.monotonic() + _REACH_TIMEOUT_S
    while True:
        with grpc.insecure_channel(gcs) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                  timeout=_PROBE_TIMEOUT_S, metadata=metadata)
                return "ok"
            except grpc.RpcError as err:
                code = err.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return "refused"
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return "unknown"
        if time.monotonic() >= deadline:
            return "unreachable"
        time.sleep(0.5)


def check_cluster_auth(address: str) -> None:
    """Make this process present the cluster's token when the cluster wants one, or raise a
    one-line ClusterError saying what to do, within seconds (``ray.init`` would retry an
    unauthenticated connection for 20 s, then print a traceback).

    Ray 2.60 sends the token only when RAY_AUTH_MODE=token. Without that variable this asks the
    cluster first (no token), and turns token mode on only for a cluster that wants one: in
    token mode this driver's own server would refuse a cluster that sends none. An explicit
    RAY_AUTH_MODE is respected. Nothing here turns authentication off.
    """
    gcs = _gcs_address(address)
    if gcs is None or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # Ray resolves or encrypts these itself; its own errors apply
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        if _answer(gcs, ()) == "refused":
            raise ClusterError(
                f"the Ray cluster at {gcs} requires its authentication token, but "
                f"{AUTH_MODE_ENV}={mode} is set here: unset it (ray-lips then sends the token "
                "from ~/.ray/auth_token or $RAY_AUTH_TOKEN by itself)")
        return
    if mode is None and _answer(gcs, ()) != "refused":
        return  # a cluster without token authentication (or one Ray explains itself)
    metadata = _token_metadata()
    if not metadata:
        raise ClusterError(f"the Ray cluster at {gcs} requires an authentication token and "
                           f"this machine has none: {_TOKEN_HINT}")
    if _answer(gcs, metadata) == "refused":
        raise ClusterError(f"the Ray cluster at {gcs} refused the authentication token from "
                           f"{_token_source()}: use the head node's token; {_TOKEN_HINT}")
    if mode is None:
        _use_token_auth()


def _answer(gcs: str, metadata: tuple[tuple[str, str], ...]) -> str:
    """``_probe``, with an unreachable cluster as a ClusterError."""
    answer = _probe(gcs, metadata)
    if answer == "unreachable":
        raise ClusterError(f"no Ray cluster answers at {gcs} (tried for "
                           f"{_REACH_TIMEOUT_S:.0f} s); check --address or $RAY_ADDRESS and "
                           "that `ray start --head` runs there")
    return answer


def _import_in_background(modules: Sequence[str]) -> threading.Thread:
    """Import ``modules`` in a daemon thread. A failure is left to the caller's own import of
    the same module, which raises it where it is handled."""

    def load() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=load, name="ray-lips-imports", daemon=True)
    thread.start()
    return thread


# A private local Ray starts what a run needs and nothing that serves data: no dashboard, and
# no metrics agent exporting Prometheus data on 0.0.0.0 without a token.
PRIVATE_RAY_OPTIONS: dict = {
    "include_dashboard": False,
    "_system_config": {"enable_metrics_collection": False},
}


_METRICS_PORT_ENVS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
_reserved_port: socket.socket | None = None  # held while this process lives


@contextmanager
def _no_metrics_servers() -> Iterator[None]:
    """Keep Ray's autoscaler and job server from serving Prometheus data over plain HTTP.

    Both start an unauthenticated metrics server on 0.0.0.0 whenever ``prometheus_client`` is
    importable (the tracker extras bring it), and Ray has no switch for them. Their ports come
    from the environment of the processes Ray starts, so both are pointed at a port this
    process holds bound (not listening: it accepts nothing); their servers fail to start (Ray
    logs that in its own log files) and nothing else changes."""
    global _reserved_port
    if _reserved_port is None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.bind(("0.0.0.0", 0))
        _reserved_port = holder
    port = str(_reserved_port.getsockname()[1])
    before = {name: os.environ.get(name) for name in _METRICS_PORT_ENVS}
    os.environ.update(dict.fromkeys(_METRICS_PORT_ENVS, port))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _workers_ignore_working_dir() -> Iterator[None]:
    """Start or join Ray from an empty private folder.

    ``ray.init`` puts the caller's working directory first on every worker's ``sys.path``, so a
    ``sklearn/`` or ``torch/`` folder where the user happens to stand would be imported inside
    the driver actor and the pools. Only modules the user names on ``PYTHONPATH`` (made
    absolute here, as the local Ray's workers start in that empty folder) reach the workers.
    """
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    if entries:
        os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(e).resolve()) for e in entries)
    previous = os.getcwd()
    os.chdir(_empty_folder())
    try:
        yield
    finally:
        os.chdir(previous)


def _empty_folder() -> str:
    folder = tempfile.mkdtemp(prefix="ray-lips-cwd-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def check_resources(cfg: ExperimentConfig, concurrent_runs: int = 1) -> None:
    """Stop with a clear message when the cluster cannot host the pools at all."""
    total = ray.cluster_resources()
    res = cfg.resources
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    if res.gpus_per_pool > 0 and gpus == 0:
        raise ClusterError(
            f"resources.gpus_per_pool is {res.gpus_per_pool} but Ray reports no GPU in this "
            "cluster; set resources.gpus_per_pool=0 to train on CPUs")
    short = RunNeed.of(cfg, concurrent_runs).short(total)
    if "GPU" in short:
        raise ClusterError(
            f"resources: {concurrent_runs} run(s) x {res.pools} pools x {res.gpus_per_pool} GPU "
            f"= {short['GPU'][0]:g} GPUs, but the cluster has {gpus:g}")
    if "CPU" in short:
        raise ClusterError(
            f"resources: {concurrent_runs} run(s) x ({res.pools} pools x {res.cpus_per_pool} CPU "
            f"+ {res.driver_cpus} driver CPU) = {short['CPU'][0]:g} CPUs, but the cluster has "
            f"{cpus:g}; lower resources.pools or resources.cpus_per_pool")
