"""The algorithms against known answers, and the engine's guarantees for every one of them."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from same_runs import assert_pool_count_and_resume_invariant, assert_same_tables, final_model
from torch import nn

from ray_lips.algorithms import build_algorithm, registry
from ray_lips.algorithms.base import ClientRound, Trained, TrainJob
from ray_lips.config import ConfigError, ExperimentConfig, validate_config
from ray_lips.core.aggregate import add_client, to_state
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.pools.client_store import ClientStore
from ray_lips.training.local import LocalResult, correct_gradients

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _config(tiny_config: dict, algorithm: str, handout: str = "dense", **sections) -> dict:
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm=algorithm, handout=handout, **sections)
    tree["train"].update(rounds=4, local_epochs=1, finetune_epochs=1, checkpoint_every=2)
    return tree


# ----- configuration -------------------------------------------------------------------------
def test_lips_shorthand_is_fedavg_with_the_lips_handout(tiny_config):
    cfg = validate_config(tiny_config)  # algorithm: lips
    assert (cfg.algorithm, cfg.handout) == ("fedavg", "lips")
    assert validate_config({**tiny_config, "algorithm": "fedprox"}).handout == "dense"


@pytest.mark.parametrize("algorithm", ["fedper", "ditto", "local"])
def test_lips_on_an_algorithm_without_a_handed_global_model_is_a_config_error(tiny_config,
                                                                             algorithm):
    with pytest.raises(ConfigError, match=rf"handout: 'lips' .* algorithm: '{algorithm}'"):
        validate_config({**tiny_config, "algorithm": algorithm, "handout": "lips"})


def test_config_errors_come_before_torch_loads():
    """The registry and the schema built from it load without torch, so a bad config stops in
    a fraction of a second, with the algorithms' own sections checked."""
    code = ("import sys\n"
            "import ray_lips.config, ray_lips.algorithms.registry\n"
            "from ray_lips.config import ConfigError, validate_config\n"
            "try:\n"
            "    validate_config({'algorithm': 'fedprox', 'fedprox': {'mu': -1}})\n"
            "except ConfigError as err:\n"
            "    print(err)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "fedprox.mu: Input should be greater than or equal to 0" in done.stdout


def test_every_builtin_algorithm_is_found_with_its_section():
    """Built-ins are the package's modules: each has its name, and its Options are the
    config's section of that name (with the Options' defaults)."""
    found = registry.builtin()
    folder = Path(registry.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py")
                     if p.stem not in ("__init__", "base", "registry"))
    assert sorted(cls.__module__.rpartition(".")[2] for cls in found.values()) == modules
    assert {"fedavg", "fedprox", "scaffold", "fedper", "ditto", "local"} <= set(found)
    assert list(found) == sorted(found, key=lambda name: (found[name].order, name))
    assert list(found)[0] == "fedavg"
    assert registry.composable_with_lips() == tuple(
        name for name, cls in found.items() if cls.sparse_handout)
    assert not {"fedper", "ditto", "local"} & set(registry.composable_with_lips())
    defaults = ExperimentConfig()
    for name, cls in found.items():
        if cls.Options.model_fields:
            assert getattr(defaults, name) == cls.Options()
        else:
            assert name not in ExperimentConfig.model_fields


# ----- known answers -------------------------------------------------------------------------
def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(tmp_path, tiny_config):
    run_local(validate_config(_config(tiny_config, "fedavg")), tmp_path / "fedavg")
    run_local(validate_config(_config(tiny_config, "fedprox", fedprox={"mu": 0.0})),
              tmp_path / "prox")
    assert_same_tables(tmp_path / "fedavg", tmp_path / "prox")
    a, b = final_model(tmp_path / "fedavg"), final_model(tmp_path / "prox")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedprox_pulls_clients_towards_their_start_model(tmp_path, tiny_config):
    finals = {}
    for mu in (0.0, 10.0):
        tree = _config(tiny_config, "fedprox", fedprox={"mu": mu})
        tree["train"].update(rounds=1, local_epochs=3)
        run_local(validate_config(tree), tmp_path / f"mu{mu}")
        finals[mu] = final_model(tmp_path / f"mu{mu}")
    start = FederatedRun(validate_config(_config(tiny_config, "fedavg")), tmp_path / "init")
    init = start.global_state
    start.close()

    def moved(state):  # how far the parameters (not BatchNorm statistics) went
        return sum(float((state[k] - init[k]).norm()) for k in init
                   if init[k].is_floating_point() and "running" not in k)

    assert moved(finals[10.0]) < 0.8 * moved(finals[0.0])


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold"])
def test_lips_with_sparsity_zero_is_the_algorithm_itself(tmp_path, tiny_config, algorithm):
    dense = _config(tiny_config, algorithm)
    sparse = _config(tiny_config, algorithm, handout="lips")
    sparse["lips"]["sparsity"] = 0.0
    run_local(validate_config(dense), tmp_path / "dense")
    run_local(validate_config(sparse), tmp_path / "sparse")
    assert_same_tables(tmp_path / "dense", tmp_path / "sparse")


def test_scaffold_with_zero_control_variates_is_fedavg_in_its_first_round(tmp_path, tiny_config):
    states = []
    for algorithm in ("fedavg", "scaffold"):
        run = FederatedRun(validate_config(_config(tiny_config, algorithm)), tmp_path / algorithm)
        run.run_round()
        states.append(run.global_state)
        if algorithm == "scaffold":
            assert any(float(c.abs().max()) > 0 for c in run.server_state.values())
        run.close()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ----- SCAFFOLD on a least-squares problem ----------------------------------------------------
class _Vector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


@dataclass
class _QuadraticClients:
    """A trainer of clients whose loss is 1/(2n) ||A_i w - b_i||^2, trained by K steps of
    plain gradient descent (with the algorithm's correction): the setting of SCAFFOLD's
    analysis, where the optimum has a closed form."""

    problems: list[tuple[torch.Tensor, torch.Tensor]]
    lr: float
    steps: int
    momentum: float = 0.0
    store: ClientStore = field(default_factory=ClientStore)

    def round(self, round_idx: int, state: dict, message: dict) -> ClientRound:
        weight = sum(len(b) for _, b in self.problems)
        return ClientRound(store=self.store, global_state=state, handed=lambda client: state,
                           round_idx=round_idx, message=message, trainer=self,
                           samples=lambda client: len(self.problems[client][1]),
                           total_weight=weight, population_weight=weight, evaluate=False)

    def train(self, jobs: list[TrainJob], round_idx: int,
              evaluate: bool = False) -> list[Trained]:
        out = []
        for job in jobs:
            a, b = self.problems[job.client]
            w = job.start["w"].clone().requires_grad_(True)
            buffer = None  # a fresh momentum buffer each round, as local_train's optimiser
            for _ in range(self.steps):
                loss = 0.5 * ((a @ w - b) ** 2).sum() / len(b)
                w.grad = None
                loss.backward()
                if job.correction is not None:
                    correct_gradients({"w": w}, job.correction)
                with torch.no_grad():
                    buffer = w.grad.clone() if buffer is None else \
                        buffer * self.momentum + w.grad
                    w -= self.lr * buffer
            out.append(Trained(job.client, LocalResult(float(loss.detach()), self.steps, None),
                               {"w": w.detach().clone()}))
        return out


def _federate(algorithm: str, ctx: _QuadraticClients, rounds: int, tiny_config) -> torch.Tensor:
    tree = _config(tiny_config, algorithm)
    tree["train"].update(lr=ctx.lr, momentum=ctx.momentum)
    alg = build_algorithm(validate_config(tree), _Vector(ctx.problems[0][0].shape[1]))
    state = {"w": torch.zeros(ctx.problems[0][0].shape[1], dtype=torch.float64)}
    server = alg.init_server_state(state)
    for r in range(rounds):
        this_round = ctx.round(r, state, alg.server_message(server))
        sums: dict = {}
        for client in range(len(ctx.problems)):
            for update in alg.train(this_round, [client]):
                for part, (tensors, weight) in update.parts.items():
                    sums[part] = add_client(sums.get(part), tensors, weight)
        averages = {part: to_state(total, {k: state[k] for k in total})
                    for part, total in sums.items()}
        state, server = alg.aggregate(state, averages, server)
    return state["w"]


def _least_squares() -> tuple[list, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(0)
    dim, clients = 4, 4
    problems = []
    for k in range(clients):  # heterogeneous: differently scaled features and targets
        a = torch.randn(20, dim, generator=gen, dtype=torch.float64) * (1 + k)
        b = torch.randn(20, generator=gen, dtype=torch.float64) + 3 * k
        problems.append((a, b))
    hessian = sum(a.T @ a for a, _ in problems)
    optimum = torch.linalg.solve(hessian, sum(a.T @ b for a, b in problems))
    # lr below 1/L of the steepest client; 10 local steps make FedAvg drift.
    lr = 0.5 / max(float(torch.linalg.eigvalsh(a.T @ a / 20).max()) for a, _ in problems)
    return problems, optimum, lr


def test_scaffold_reaches_the_least_squares_optimum_where_fedavg_stalls(tiny_config):
    problems, optimum, lr = _least_squares()
    fedavg = _federate("fedavg", _QuadraticClients(problems, lr, 10), 300, tiny_config)
    scaffold = _federate("scaffold", _QuadraticClients(problems, lr, 10), 300, tiny_config)
    assert float((scaffold - optimum).norm()) < 1e-3
    assert float((fedavg - optimum).norm()) > 0.05


def test_scaffold_with_momentum_sgd_still_reaches_the_optimum(tiny_config):
    """Local SGD with momentum 0.9 (as the paper's setting): the control variates divide the
    displacement by the momentum-weighted step count, not by K."""
    problems, optimum, lr = _least_squares()
    ctx = _QuadraticClients(problems, lr / 10, 5, momentum=0.9)  # lr / (1 - momentum): as above
    scaffold = _federate("scaffold", ctx, 400, tiny_config)
    assert float((scaffold - optimum).norm()) < 1e-3


# ----- personalised and local algorithms -------------------------------------------------------
def test_local_only_is_each_client_training_alone(tmp_path, tiny_config):
    from ray_lips.core.run import build_payloads, initial_model
    from ray_lips.data import load_dataset
    from ray_lips.pools.client_pool import local_settings
    from ray_lips.training.local import local_train
    from ray_lips.training.trainers import stream_generators

    tree = _config(tiny_config, "local")
    tree["train"].update(batched=False, rounds=3)
    cfg = validate_config(tree)
    run = FederatedRun(cfg, tmp_path / "run")
    while not run.done:
        row = run.run_round()
        assert row["acc_global"] != row["acc_global"]  # NaN: there is no global model
    dataset = load_dataset(cfg.data)
    payloads = build_payloads(cfg, dataset, run.assignment)
    shards = {s.client: s for p in payloads for s in p.shards}
    norm = payloads[0].norm
    for pool in run.pools.pools:
        for client in pool.clients():
            model = initial_model(cfg, tuple(dataset.sample_shape), dataset.num_classes)
            for r in range(cfg.train.rounds):
                local_train(model, shards[client].x_train, shards[client].y_train,
                            local_settings(cfg), norm, *stream_generators(cfg.seed, "local",
                                                                          client, r))
            held = pool.algorithm.held_state(pool.view(), client)
            for key, value in model.state_dict().items():
                assert torch.equal(value, held[key]), (client, key)
    run.close()


def test_fedper_shares_the_body_and_keeps_heads_personal(tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, "fedper")), tmp_path / "run")
    personal = run.pools.pools[0].algorithm.personal
    classifier = [g for g in run.groups if g.kind == "linear"][-1]
    assert set(personal) == set(classifier.param_names)  # the classifier stays local
    for _ in range(2):
        row = run.run_round()
        held = {c: pool.algorithm.held_state(pool.view(), c)
                for pool in run.pools.pools for c in pool.clients()}
        for key in run.global_state:
            values = [held[c][key] for c in held]
            if key in personal:
                assert not all(torch.equal(values[0], v) for v in values[1:]), key
            else:
                assert all(torch.equal(run.global_state[key], v) for v in values), key
        assert row["acc_global"] != row["acc_global"] and row["acc_after"] > 0
    run.close()


def test_ditto_with_a_large_lambda_keeps_personal_models_at_the_global_one(tmp_path,
                                                                          tiny_config):
    gaps = {}
    for lam in (0.0, 20.0):  # lr * lam = 1: each step pulls v all the way back to w
        tree = _config(tiny_config, "ditto", ditto={"lam": lam, "personal_epochs": 5})
        tree["train"].update(lr=0.05, momentum=0.0, rounds=1)
        run = FederatedRun(validate_config(tree), tmp_path / f"lam{lam}")
        start = run.global_state
        run.run_round()
        pool = run.pools.pools[0]
        gaps[lam] = max(
            sum(float((pool.algorithm.held_state(pool.view(), c)[k] - start[k]).norm())
                for k in start if start[k].is_floating_point() and "running" not in k)
            for c in pool.clients())
        run.close()
    assert gaps[20.0] < 0.3 * gaps[0.0], gaps


# ----- the engine's guarantees, for every algorithm --------------------------------------------
METHODS = [(name, "dense") for name in registry.names()] + [("fedprox", "lips"),
                                                            ("scaffold", "lips")]


@pytest.mark.parametrize(("algorithm", "handout"), METHODS)
def test_same_numbers_with_one_or_three_pools_and_after_a_resume(tmp_path, tiny_config,
                                                                 algorithm, handout):
    # interrupted after round 3 (last checkpoint after round 2), then resumed
    assert_pool_count_and_resume_invariant(_config(tiny_config, algorithm, handout), tmp_path)


def test_client_state_survives_a_resume_through_the_checkpoint(tmp_path, tiny_config):
    cfg = validate_config(_config(tiny_config, "scaffold"))
    run = FederatedRun(cfg, tmp_path / "run")
    run.run_round()
    run.run_round()  # checkpoint after round 2 (checkpoint_every = 2)
    kept = {c: pool.store.get(c, "scaffold.c") for pool in run.pools.pools
            for c in pool.clients()}
    run.close()
    resumed = FederatedRun(cfg, tmp_path / "run")
    assert resumed.round == 2
    for pool in resumed.pools.pools:
        for client in pool.clients():
            again = pool.store.get(client, "scaffold.c")
            assert all(torch.equal(kept[client][k], again[k]) for k in again)
    resumed.close()


def test_client_state_spills_past_its_budget_and_comes_back_intact(tmp_path):
    store = ClientStore(budget_bytes=3 * 4 * 100, spill_root=str(tmp_path))
    entries = {c: {"w": torch.full((100,), float(c))} for c in range(10)}
    for client, entry in entries.items():
        store.put(client, "slot", entry)
    assert store.memory_bytes <= 3 * 400 and store.spilled == 7
    assert len(list(tmp_path.rglob("*.pt"))) == 7
    exported = store.export()
    for client in range(10):
        assert torch.equal(store.get(client, "slot")["w"], entries[client]["w"])
        assert torch.equal(exported["slot"][client]["w"], entries[client]["w"])
    store.replace_slot("slot", {})
    assert store.clients("slot") == [] and not list(tmp_path.rglob("*.pt"))
