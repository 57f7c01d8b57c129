"""FedDyn against a known answer, and the engine's guarantees for it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from same_runs import assert_pool_count_and_resume_invariant
from torch import nn

from ray_lips.algorithms import build_algorithm, registry
from ray_lips.algorithms.base import ClientRound, Trained, TrainJob
from ray_lips.config import ExperimentConfig, validate_config
from ray_lips.core.aggregate import add_client, to_state
from ray_lips.core.run import FederatedRun
from ray_lips.pools.client_store import ClientStore
from ray_lips.training.local import LocalResult, correct_gradients

# alpha against the clients' curvature (Hessian eigenvalues 0.7 to 26 here): 1 converges in a
# few hundred rounds; the paper's 0.01 suits networks, and gets there far more slowly here.
ALPHA = 1.0


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_feddyn_is_a_builtin_global_model_algorithm_with_its_section():
    cls = registry.builtin()["feddyn"]
    assert (cls.label, cls.has_global_model, cls.sparse_handout) == ("FedDyn", True, True)
    assert "feddyn" in registry.composable_with_lips()
    assert ExperimentConfig().feddyn.alpha == 0.01
    assert validate_config({"algorithm": "feddyn", "handout": "lips"}).handout == "lips"


# ----- a heterogeneous least-squares problem ---------------------------------------------------
class _Vector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


@dataclass
class _Quadratic:
    """Clients whose loss is 1/(2n) ||A_k w - b_k||^2, each trained by K steps of gradient
    descent with the algorithm's correction: the optimum of the federation has a closed form."""

    problems: list[tuple[torch.Tensor, torch.Tensor]]
    lr: float
    steps: int
    store: ClientStore = field(default_factory=ClientStore)

    def train(self, jobs: list[TrainJob], round_idx: int,
              evaluate: bool = False) -> list[Trained]:
        out = []
        for job in jobs:
            a, b = self.problems[job.client]
            w = job.start["w"].clone().requires_grad_(True)
            for _ in range(self.steps):
                loss = 0.5 * ((a @ w - b) ** 2).sum() / len(b)
                w.grad = None
                loss.backward()
                if job.correction is not None:
                    correct_gradients({"w": w}, job.correction)
                with torch.no_grad():
                    w -= self.lr * w.grad
            out.append(Trained(job.client, LocalResult(float(loss.detach()), self.steps, None),
                               {"w": w.detach().clone()}))
        return out

    def accuracy(self, clients, states):
        return [0.0] * len(clients)


def _federate(algorithm: str, ctx: _Quadratic, rounds: int, tiny_config, participants=None,
              **sections) -> torch.Tensor:
    """Run ``algorithm``'s two sides over the clients of ``ctx`` (``participants(r)``: the
    clients of round r, all by default), as the driver and one pool do."""
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm=algorithm, handout="dense", **sections)
    tree["train"].update(lr=ctx.lr, momentum=0.0)
    dim = ctx.problems[0][0].shape[1]
    alg = build_algorithm(validate_config(tree), _Vector(dim))
    state = {"w": torch.zeros(dim, dtype=torch.float64)}
    server = alg.init_server_state(state)
    population = sum(len(b) for _, b in ctx.problems)
    for r in range(rounds):
        members = participants(r) if participants else range(len(ctx.problems))
        handed = dict(state)
        this_round = ClientRound(
            store=ctx.store, global_state=handed, handed=lambda client, s=handed: s,
            round_idx=r, message=alg.server_message(server), trainer=ctx,
            samples=lambda client: len(ctx.problems[client][1]),
            total_weight=sum(len(ctx.problems[c][1]) for c in members),
            population_weight=population, evaluate=False)
        sums: dict = {}
        for client in members:
            for update in alg.train(this_round, [client]):
                for part, (tensors, weight) in update.parts.items():
                    sums[part] = add_client(sums.get(part), tensors, weight)
        averages = {part: to_state(total, {k: state[k] for k in total})
                    for part, total in sums.items()}
        state, server = alg.aggregate(state, averages, server)
    return state["w"]


def _least_squares() -> tuple[list, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(0)
    problems = []
    for k in range(4):  # heterogeneous: differently scaled features and targets
        a = torch.randn(20, 4, generator=gen, dtype=torch.float64) * (1 + k)
        b = torch.randn(20, generator=gen, dtype=torch.float64) + 3 * k
        problems.append((a, b))
    optimum = torch.linalg.solve(sum(a.T @ a for a, _ in problems),
                                 sum(a.T @ b for a, b in problems))
    lr = 0.5 / max(float(torch.linalg.eigvalsh(a.T @ a / 20).max()) for a, _ in problems)
    return problems, optimum, lr


def test_feddyn_reaches_the_least_squares_optimum_where_fedavg_stalls(tiny_config):
    problems, optimum, lr = _least_squares()
    fedavg = _federate("fedavg", _Quadratic(problems, lr, 10), 300, tiny_config)
    feddyn = _federate("feddyn", _Quadratic(problems, lr, 10), 300, tiny_config,
                       feddyn={"alpha": ALPHA})
    assert float((fedavg - optimum).norm()) > 0.05
    assert float((feddyn - optimum).norm()) < 1e-3


def test_feddyn_reaches_the_optimum_with_partial_participation(tiny_config):
    """Two of four clients a round: h's 1/m (all clients) keeps the fixed point the
    federation's optimum."""
    problems, optimum, lr = _least_squares()
    pairs = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]
    feddyn = _federate("feddyn", _Quadratic(problems, lr, 10), 600, tiny_config,
                       participants=lambda r: pairs[r % len(pairs)], feddyn={"alpha": ALPHA})
    assert float((feddyn - optimum).norm()) < 1e-3



# ----- the engine's guarantees ------------------------------------------------------------------
@pytest.mark.parametrize("handout", ["dense", "lips"])
def test_feddyn_same_numbers_with_one_or_three_pools_and_after_a_resume(tmp_path, tiny_config,
                                                                        handout):
    """Half the clients a round, so clients keep g_k across rounds they skip and across the
    checkpoint."""
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm="feddyn", handout=handout, feddyn={"alpha": 0.1})
    tree["train"].update(rounds=4, local_epochs=1, finetune_epochs=1, checkpoint_every=2,
                         participation=0.5)

    def holds_h(stopped: FederatedRun) -> None:  # after round 3; resumes from round 2's
        assert any(float(h.abs().max()) > 0 for h in stopped.server_state.values())

    assert_pool_count_and_resume_invariant(tree, tmp_path, at_stop=holds_h)
