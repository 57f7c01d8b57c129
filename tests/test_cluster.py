"""Real Ray clusters on this machine: `ray start --head`, `ray job submit`, a second node.

Every node is a `ray start ... --block` process in its own session and temp dir, stopped by
signalling exactly that process group (never `ray stop`, which would stop other Rays too).
Token authentication stays on: Ray's own clients (`ray job`, `ray list`) get RAY_AUTH_MODE=token
and read ~/.ray/auth_token; `ray-lips` gets no RAY_AUTH_MODE (it finds the token itself). The
head node runs with its own home folder (a copy of the token in it), so a job writes nothing
into the real one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
GLOBAL_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")
RUN_FILES = ("config.yaml", "status.json", "rounds.parquet", "layers.parquet", "clients.parquet")
TINY = ["sweep.grid.seed=[0]", "train.rounds=2", "data.clients=6", "data.train_per_client=30",
        "train.local_epochs=1", "train.finetune_epochs=1", "train.eval_test_samples=100"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # clients present ~/.ray/auth_token; auth stays on
    return env


def _sweep_command() -> list[str]:
    """`ray-lips sweep` once the command is registered on the main group."""
    from ray_lips.cli.commands import main

    if "sweep" in main.commands:
        return ["ray-lips", "sweep"]
    return ["python", "-m", "ray_lips.cli.sweep"]


def _our_pids(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (our unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if marker in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


@dataclass
class Node:
    proc: subprocess.Popen
    temp_dir: Path
    log: Path


def cluster_token() -> str:
    """The token the test clusters use: this user's ~/.ray/auth_token, made by Ray's own
    command if there is none yet (as a local `ray.init` would)."""
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True,
                       timeout=60, env=_env())
    return path.read_text().strip()


def home_with_token(home: Path) -> Path:
    """``home`` as a home folder holding the cluster's token in .ray/auth_token."""
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    token = home / ".ray" / "auth_token"
    token.write_text(cluster_token())
    token.chmod(0o600)
    return home


@contextlib.contextmanager
def ray_node(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Node]:
    """A `ray start ... --block` node in a fresh short temp dir; stopped on exit. ``env``: extra
    environment variables for the node (HOME, say)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    agent, grpc, metrics, runtime_env, client = _free_ports(5)
    command = [RAY, "start", *args, "--temp-dir", str(temp_dir), "--block",
               "--disable-usage-stats", "--object-store-memory", str(200 * 1024**2),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
               str(grpc), "--metrics-export-port", str(metrics), "--runtime-env-agent-port",
               str(runtime_env)]
    if "--head" in args:
        command += ["--ray-client-server-port", str(client)]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**_env(), **(env or {})}, start_new_session=True)
    try:
        yield Node(proc, temp_dir, log)
    finally:
        _stop(proc, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM our `ray start --block` (it drains the node, then stops its own processes),
    then SIGKILL whatever of ours is left: its process group, then anything naming our temp dir.
    Signalling the whole group at once would kill the GCS before the head could drain."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.time() + 15
    while _our_pids(marker) and time.time() < deadline:
        time.sleep(0.5)
    for pid in _our_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class NodeDied(RuntimeError):
    pass


def _wait_for(check, what: str, node: Node, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if node.proc.poll() is not None:
            raise NodeDied(f"{what}: ray start exited\n{node.log.read_text()[-3000:]}")
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {timeout:.0f} s\n{node.log.read_text()[-3000:]}")


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answers (auth may refuse this route): the server is up
    except OSError:
        return False


def _ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO)


def _alive_nodes(gcs: str) -> list[dict]:
    result = _ray_cli("list", "nodes", "--address", gcs, "--format", "json", "--detail")
    if result.returncode != 0:
        return []
    return [n for n in json.loads(result.stdout) if n.get("state") == "ALIVE"]


@dataclass
class Head:
    node: Node
    dashboard: str
    gcs: str
    home: Path | None = None  # the head node's (and so every job's) home folder


@pytest.fixture(scope="module")
def global_cluster_file():
    """Nothing here may touch /tmp/ray/ray_current_cluster (the file a bare ray.init reads)."""
    before = GLOBAL_CLUSTER_FILE.stat().st_mtime_ns if GLOBAL_CLUSTER_FILE.exists() else None
    yield
    after = GLOBAL_CLUSTER_FILE.stat().st_mtime_ns if GLOBAL_CLUSTER_FILE.exists() else None
    assert after == before, "a test wrote /tmp/ray/ray_current_cluster"


@contextlib.contextmanager
def _start_head(log_dir: Path, attempt: int, home: Path | None = None) -> Iterator[Head]:
    gcs_port, dash_port = _free_ports(2)
    args = ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash_port), "--num-cpus", "2", "--resources", '{"head": 1}']
    # ray job stop: SIGTERM, then SIGKILL after this many seconds (Ray's default is 3; more here
    # so that a loaded test machine does not decide what a stopped sweep leaves behind)
    env = {"RAY_JOB_STOP_WAIT_TIME_S": "30"}
    if home is not None:
        env["HOME"] = str(home)
    with ray_node(args, log_dir / f"head{attempt}.log", env) as node:
        dashboard = f"http://127.0.0.1:{dash_port}"
        cluster_file = node.temp_dir / "ray_current_cluster"
        _wait_for(lambda: cluster_file.exists() and _dashboard_up(dashboard), "head", node)
        gcs = cluster_file.read_text().strip()  # node-ip:port, written into our temp dir
        assert gcs.endswith(f":{gcs_port}")
        _wait_for(lambda: len(_alive_nodes(gcs)) == 1, "head in the state API", node)
        yield Head(node, dashboard, gcs, home)


@pytest.fixture(scope="module")
def head(tmp_path_factory, global_cluster_file) -> Iterator[Head]:
    """A head node (2 CPUs); a second try when a loaded machine makes the first start time out."""
    log_dir = tmp_path_factory.mktemp("head")
    home = home_with_token(tmp_path_factory.mktemp("head_home"))
    for attempt in (1, 2):
        with contextlib.ExitStack() as stack:
            try:
                started = stack.enter_context(_start_head(log_dir, attempt, home))
            except NodeDied:
                if attempt == 2:
                    raise
                continue
            yield started
            return


def _submit(head: Head, storage: Path, *sets: str, timeout: float = 240):
    command = [*_sweep_command(), "sweeps/quickstart.yaml"]
    for item in (*TINY, *sets, f"sweep.storage_path={storage}"):
        command += ["--set", item]
    return _ray_cli("job", "submit", "--address", head.dashboard, "--working-dir", str(REPO),
                    "--", *command, timeout=timeout)


def _client_pools(head: Head) -> list[dict]:
    """Every ClientPoolActor the cluster has seen (dead ones included), with its node."""
    listed = _ray_cli("list", "actors", "--address", head.gcs, "--format", "json", "--detail",
                      "--limit", "10000", "--filter", "class_name=ClientPoolActor")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def _trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if (p / "params.json").exists())


def test_job_submit_to_a_head_node_runs_the_quickstart_sweep(head, tmp_path):
    storage = tmp_path / "results"
    result = _submit(head, storage)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    assert f"storage: {storage / 'quickstart'}" in result.stdout
    trials = _trial_dirs(storage / "quickstart")
    assert len(trials) == 2
    for trial in trials:
        for name in RUN_FILES:
            assert (trial / name).exists(), f"{trial.name} lacks {name}"
        assert json.loads((trial / "status.json").read_text())["status"] == "finished"
        assert len(pd.read_parquet(trial / "rounds.parquet")) == 2
    assert (head.node.temp_dir / "ray_current_cluster").exists()


def test_two_node_cluster_spreads_the_pools_over_both_nodes(head, tmp_path):
    args = ["--address", head.gcs, "--num-cpus", "2", "--resources", '{"worker": 1}']
    with ray_node(args, tmp_path / "worker.log") as worker:
        _wait_for(lambda: len(_alive_nodes(head.gcs)) == 2, "worker node", worker)
        nodes = {n["node_id"]: n for n in _alive_nodes(head.gcs)}
        earlier = {a["actor_id"] for a in _client_pools(head)}
        # 3 pools of 1 CPU do not fit on one 2-CPU node: the placement group spans both nodes
        storage = tmp_path / "results"
        result = _submit(head, storage, "sweep.variants=[{algorithm: lips}]",
                         "resources.pools=3", "resources.cpus_per_pool=1")
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        (trial,) = _trial_dirs(storage / "quickstart")
        for name in RUN_FILES:
            assert (trial / name).exists(), f"{trial.name} lacks {name}"
        pools = [a for a in _client_pools(head) if a["actor_id"] not in earlier]
        assert len(pools) == 3
        kinds = {next(k for k in ("head", "worker")
                      if k in nodes[p["node_id"]]["resources_total"]) for p in pools}
        assert kinds == {"head", "worker"}, pools


# ----- joining a cluster with token authentication, as a user of ray-lips does ---------------
RUN_TINY = ["train.rounds=2", "data.clients=6", "data.train_per_client=30",
            "train.local_epochs=1", "train.finetune_epochs=1", "train.eval_test_samples=100"]
OPT_OUT_BANNER = "RAY_AUTH_MODE=disabled"  # Ray's "Set RAY_AUTH_MODE=disabled to opt out"
RETRY_LOG = "Failed to get cluster ID from GCS server"  # ray.init retrying without a token


def _user_env(**extra: str) -> dict[str, str]:
    """A user's shell: ray-lips on PATH, no RAY_AUTH_MODE, no RAY_ADDRESS unless given."""
    env = {k: v for k, v in _env().items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return {**env, **extra}


def _ray_lips(args: list[str], env: dict[str, str], timeout: float = 300):
    return subprocess.run(["ray-lips", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def _sets(items: list[str]) -> list[str]:
    return [part for item in items for part in ("--set", item)]


def _finished_runs(folder: Path) -> list[Path]:
    return sorted(status.parent for status in folder.rglob("status.json")
                  if json.loads(status.read_text()).get("status") == "finished")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_ray_lips_run_finds_the_clusters_token_by_itself(head, tmp_path):
    # the token in ~/.ray/auth_token, the cluster named by --address
    at_home = _ray_lips(["run", "sweeps/quickstart.yaml", "--address", head.gcs,
                         *_sets([*RUN_TINY, f"output={tmp_path / 'home_token'}"])], _user_env())
    assert at_home.returncode == 0, at_home.stderr[-4000:]
    assert len(_finished_runs(tmp_path / "home_token")) == 1
    assert OPT_OUT_BANNER not in at_home.stdout + at_home.stderr
    # the token in $RAY_AUTH_TOKEN (a home folder without one), the cluster in $RAY_ADDRESS
    empty_home = tmp_path / "empty_home"
    empty_home.mkdir()
    from_env = _ray_lips(["run", "sweeps/quickstart.yaml",
                          *_sets([*RUN_TINY, f"output={tmp_path / 'env_token'}"])],
                         _user_env(HOME=str(empty_home), RAY_AUTH_TOKEN=cluster_token(),
                                   RAY_ADDRESS=head.gcs))
    assert from_env.returncode == 0, from_env.stderr[-4000:]
    assert len(_finished_runs(tmp_path / "env_token")) == 1
    assert OPT_OUT_BANNER not in from_env.stdout + from_env.stderr


CONNECT = """
import sys
from ray_lips.cluster.connect import ClusterError, connect
try:
    connect(sys.argv[1])
except ClusterError as err:
    print(f"ClusterError: {err}")
else:
    print("connected")
"""


@pytest.mark.parametrize("token", ["wrong", "none"])
def test_a_missing_or_wrong_token_fails_at_once_in_one_line(head, tmp_path, token):
    empty_home = tmp_path / "empty_home"
    empty_home.mkdir()
    env = (_user_env(RAY_AUTH_TOKEN="wrong") if token == "wrong"
           else _user_env(HOME=str(empty_home)))
    hint = "RAY_AUTH_TOKEN" if token == "wrong" else "has none"
    joined = subprocess.run([sys.executable, "-c", CONNECT, head.gcs], capture_output=True,
                            text=True, env=env, timeout=120)
    assert joined.stdout.startswith("ClusterError: "), joined.stdout + joined.stderr[-3000:]
    assert hint in joined.stdout and "auth_token" in joined.stdout
    assert RETRY_LOG not in joined.stderr  # refused before ray.init, not after its 20 s retries

    output = tmp_path / "runs"
    run = _ray_lips(["run", "sweeps/quickstart.yaml", "--address", head.gcs,
                     *_sets([*RUN_TINY, f"output={output}"])], env, timeout=120)
    assert run.returncode == 2, run.stderr[-4000:]
    (line,) = _error_lines(run.stderr)
    assert line.startswith("error: ") and hint in line, line
    assert not output.exists() or not any(output.rglob("config.yaml")), "a run folder was left"

    storage = tmp_path / "results"
    swept = _ray_lips(["sweep", "sweeps/quickstart.yaml", "--address", head.gcs,
                       *_sets([*TINY, f"sweep.storage_path={storage}"])], env, timeout=120)
    assert swept.returncode == 2, swept.stderr[-4000:]
    line = _error_lines(swept.stderr)[-1]
    assert line.startswith("error: ") and hint in line, swept.stderr
    assert "Traceback" not in swept.stderr
    assert not (storage / "quickstart").exists()


# ----- results of a job ----------------------------------------------------------------------
def test_a_job_keeps_a_relative_outputs_results_in_its_home_folder(head):
    output = "runs/job_output_test"  # relative, as in the README's configs
    result = _ray_cli("job", "submit", "--address", head.dashboard, "--working-dir", str(REPO),
                      "--", "ray-lips", "run", "sweeps/quickstart.yaml",
                      *_sets([*RUN_TINY, f"output={output}"]), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert head.home is not None
    (run_dir,) = _finished_runs(head.home / output)
    for name in RUN_FILES:
        assert (run_dir / name).exists(), f"{run_dir} lacks {name}"
    assert str(run_dir) in result.stdout + result.stderr  # the job says where its results are
    # nothing in the job's temporary copy of the working directory
    assert not list(head.node.temp_dir.rglob("job_output_test"))


def test_ray_job_stop_marks_the_sweeps_running_trials_interrupted(head, tmp_path):
    storage = tmp_path / "results"
    job_id = f"stop_{os.getpid()}_{time.monotonic_ns()}"
    command = [*_sweep_command(), "sweeps/quickstart.yaml"]
    for item in (*TINY, "train.rounds=2000", "sweep.variants=[{algorithm: lips}]",
                 f"sweep.storage_path={storage}"):
        command += ["--set", item]
    submitted = _ray_cli("job", "submit", "--address", head.dashboard, "--working-dir",
                         str(REPO), "--submission-id", job_id, "--no-wait", "--", *command)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]

    def trial_status() -> dict:
        found = list((storage / "quickstart").glob("*/status.json"))
        return json.loads(found[0].read_text()) if found else {}

    deadline = time.time() + 300
    while not (trial_status().get("status") == "running" and trial_status().get("round", 0) >= 1):
        if time.time() > deadline:
            logs = _ray_cli("job", "logs", "--address", head.dashboard, job_id)
            pytest.fail(f"the trial never ran a round\n{logs.stdout[-4000:]}")
        time.sleep(1)
    stopped = _ray_cli("job", "stop", "--address", head.dashboard, job_id, timeout=120)
    assert stopped.returncode == 0, stopped.stdout[-4000:] + stopped.stderr[-4000:]
    # the trial's own folder (Tune writes its params.json only once it logs a first result)
    (status_file,) = (storage / "quickstart").glob("*/status.json")
    status = json.loads(status_file.read_text())
    assert status["status"] == "interrupted", status
    logs = _ray_cli("job", "logs", "--address", head.dashboard, job_id).stdout
    assert "stopped by SIGTERM" in logs and "--resume" in logs, logs[-4000:]
