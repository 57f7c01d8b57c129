"""LIPS's mask variants: ``lips.gradient: epoch_mean`` (the remembered gradient is the mean over
the last local epoch) and ``lips.mask: shared`` (one mask for every client, from the
participants' summed |g|). The defaults (last_batch, per_client) are the reference and are
covered by the other tests and benchmarks/check_same_numbers.py."""

from __future__ import annotations

import copy

import pytest
import torch
from same_runs import assert_pool_count_and_resume_invariant, assert_same_tables
from test_algorithms import _config
from test_batched import SETTINGS, _float64, _generators, _setup

from analysis.methods import label_methods
from ray_lips.algorithms.handouts.lips import GRADIENT
from ray_lips.algorithms.handouts.sparsify import keep_count, sparsify_state, top_k_mask
from ray_lips.config import ConfigError, validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.core.traffic import parts_bytes, sparse_copy_bytes, state_bytes
from ray_lips.models import eligible_parameter_names
from ray_lips.training.batched import ClientGroup
from ray_lips.training.local import Correction, local_train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----- lips.gradient: epoch_mean ----------------------------------------------------------------
def _recorded_steps(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every optimiser step's gradients (after correction and clipping: what it steps with)."""
    steps: list[dict[str, torch.Tensor]] = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        steps.append({id(p): p.grad.detach().clone() for group in self.param_groups
                      for p in group["params"] if p.grad is not None})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return steps


def _train_one(model, start, x, y, norm, settings, remember, mean, correction=None):
    model.load_state_dict(start)
    return local_train(model, x, y, settings, norm, *_generators(0), remember=remember,
                       correction=correction, remember_mean=mean)


def test_epoch_mean_is_the_mean_of_the_last_epochs_step_gradients(monkeypatch):
    """30 samples in batches of 16: two steps an epoch, two epochs. epoch_mean is the mean of
    the last epoch's two step gradients (with the correction and clipping last_batch's
    gradient has), last_batch the second of them; both stored in fp16."""
    model, starts, x, y, norm = _setup("smallcnn", clients=1)
    remember = eligible_parameter_names(model)
    params = dict(model.named_parameters())
    settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "grad_clip": 1.0})
    correction = Correction(coef=0.1, anchor={n: torch.zeros_like(p) for n, p in params.items()})
    steps = _recorded_steps(monkeypatch)
    mean = _train_one(model, starts[0], x[0], y[0], norm, settings, remember, True, correction)
    assert len(steps) == 4 and mean.steps == 4
    last_epoch = steps[2:]
    for name in remember:
        grads = [step[id(params[name])] for step in last_epoch]
        expected = ((grads[0].float() + grads[1].float()) / 2).half()
        assert mean.last_grads[name].dtype == torch.float16
        assert torch.equal(mean.last_grads[name], expected), name
    steps.clear()
    last = _train_one(model, starts[0], x[0], y[0], norm, settings, remember, False, correction)
    for name in remember:
        assert torch.equal(last.last_grads[name], steps[-1][id(params[name])].half()), name
        assert not torch.equal(last.last_grads[name], mean.last_grads[name]), name


def test_epoch_mean_of_an_epoch_of_one_batch_is_the_last_batch_gradient():
    model, starts, x, y, norm = _setup("smallcnn", clients=1)
    remember = eligible_parameter_names(model)
    one_batch = SETTINGS.__class__(**{**SETTINGS.__dict__, "batch_size": 30})
    last = _train_one(model, starts[0], x[0], y[0], norm, one_batch, remember, False)
    mean = _train_one(model, starts[0], x[0], y[0], norm, one_batch, remember, True)
    assert mean.steps == last.steps == 2
    for name in remember:
        assert torch.equal(mean.last_grads[name], last.last_grads[name]), name


@pytest.mark.parametrize("name", ["smallcnn", "resnet8"])
def test_epoch_mean_is_the_same_in_a_batched_group_as_one_at_a_time_in_float64(name):
    """In float64 the paths agree to ~1e-15 (tests/test_batched.py); the fp16 means then agree
    to one fp16 step at most."""
    model, starts, x, y, norm = _setup(name, clients=3)
    model, starts, x = _float64(model, starts, x)
    remember = eligible_parameter_names(model)
    serial = [_train_one_client(model, starts[c], x[c], y[c], norm, remember, c)
              for c in range(3)]
    group = ClientGroup(model, 3, channels_last=False)
    group.load(starts)
    gens = [_generators(c) for c in range(3)]
    batched = group.train(x, y, SETTINGS, norm, [g[0] for g in gens], [g[1] for g in gens],
                          remember=remember, remember_mean=True)
    last = _train_one_client(model, starts[0], x[0], y[0], norm, remember, 0, mean=False)
    for c in range(3):
        for key in remember:
            want, got = serial[c].last_grads[key].double(), batched[c].last_grads[key].double()
            assert got.shape == want.shape
            assert float((want - got).norm() / want.norm()) <= 2.0**-10, (c, key)
    assert any(not torch.equal(serial[0].last_grads[k], last.last_grads[k]) for k in remember)


def _train_one_client(model, start, x, y, norm, remember, client, mean=True):
    model.load_state_dict(start)
    return local_train(model, x, y, SETTINGS, norm, *_generators(client), remember=remember,
                       remember_mean=mean)


# ----- lips.mask: shared ------------------------------------------------------------------------
def _lips(tiny_config, pools=2, participation=1.0, **lips) -> dict:
    tree = _config(tiny_config, "fedavg", "lips")
    tree["lips"].update(lips)
    tree["resources"]["pools"] = pools
    tree["train"]["participation"] = participation
    return tree


def _held(run: FederatedRun) -> dict[int, dict[str, torch.Tensor]]:
    return {c: pool.handed(c) for pool in run.pools.pools for c in pool.clients()}


def _one_round(tree: dict, run_dir) -> tuple[FederatedRun, dict]:
    run = FederatedRun(validate_config(tree), run_dir)
    row = run.run_round()
    return run, row


def test_the_shared_mask_keeps_the_top_k_of_w_times_the_participants_summed_abs_gradient(
        tmp_path, tiny_config):
    """Round 0 is a sparsity round (d 0.5). Half the clients train; the per-client run keeps
    their fp16 gradients, from which sum_k |g_k| is recomputed here in float64. Every client,
    trained or not, holds the same copy: exactly the top floor(d * numel) of |w| * sum |g| of
    each eligible tensor, whatever the pool count."""
    per_client, _ = _one_round(_lips(tiny_config, participation=0.5), tmp_path / "per")
    try:
        grads = {c: pool.store.get(c, GRADIENT) for pool in per_client.pools.pools
                 for c in pool.clients() if pool.store.get(c, GRADIENT) is not None}
        reference_state = per_client.global_state
    finally:
        per_client.close()
    assert len(grads) == 3
    eligible = list(next(iter(grads.values())))
    summed = {n: sum(g[n].double().abs() for g in grads.values()).float() for n in eligible}
    held_by_pools = {}
    for pools in (1, 3):
        tree = _lips(tiny_config, pools, participation=0.5, mask="shared")
        run, row = _one_round(tree, tmp_path / f"shared{pools}")
        try:
            density = row["density"]
            state = run.global_state
            held = _held(run)
        finally:
            run.close()
        assert density == 0.5
        # the score part never reaches the algorithm: the same new global model
        assert all(torch.equal(state[k], reference_state[k]) for k in state)
        first = held[0]
        for client, copy_ in held.items():  # one copy for everyone
            assert all(torch.equal(copy_[k], first[k]) for k in first), client
        for name in eligible:
            w, score = state[name], summed[name] * state[name].abs()
            kept = first[name] != 0
            assert int(kept.sum()) == keep_count(w.numel(), density)
            assert torch.equal(kept, top_k_mask(score, keep_count(w.numel(), density)))
            assert float(score[kept].min()) >= float(score[~kept].max())
            assert torch.equal(first[name][kept], w[kept])
        expected = sparsify_state(state, eligible, density, "sensitivity", summed)
        assert all(torch.equal(first[k], expected[k]) for k in expected)
        held_by_pools[pools] = first
    assert all(torch.equal(held_by_pools[1][k], held_by_pools[3][k]) for k in held_by_pools[1])


def test_the_gradient_scorer_and_random_scorer_share_one_mask_too(tmp_path, tiny_config):
    for scorer in ("gradient", "random"):
        run, _ = _one_round(_lips(tiny_config, scorer=scorer, mask="shared"), tmp_path / scorer)
        try:
            held = _held(run)
            state = run.global_state
        finally:
            run.close()
        first = held[0]
        assert all(torch.equal(h[k], first[k]) for h in held.values() for k in first), scorer
        eligible = [k for k in first if not torch.equal(first[k], state[k])]
        assert eligible, scorer  # it is sparse
    run, _ = _one_round(_lips(tiny_config, scorer="random"), tmp_path / "random_per_client")
    try:
        held = _held(run)
    finally:
        run.close()
    assert any(not torch.equal(held[0][k], held[1][k]) for k in eligible)  # per client differs


def test_shared_mask_traffic_counts_every_receivers_sparse_copy_and_the_uploaded_scores(
        tmp_path, tiny_config):
    tree = _lips(tiny_config, participation=0.5, mask="shared")
    run, row = _one_round(tree, tmp_path / "r")
    try:
        state = run.global_state
        eligible = run.handout.eligible
        everyone = [r for pool in run.pools.pools for r in pool.downloads(pool.clients())]
        dense_round = run.run_round()  # round 1: dense, so no score is summed or uploaded
    finally:
        run.close()
    kept = {n: keep_count(state[n].numel(), row["density"]) for n in eligible}
    sparse = sparse_copy_bytes(state, kept)
    assert len(everyone) == 6 and all(r["down_bytes"] == sparse for r in everyone)
    assert row["down_bytes"] == 3 * sparse  # the receivers: this round's participants
    model_bytes = parts_bytes({"model": (state, 1.0)})
    grad_bytes = sum(state[n].numel() * 2 for n in eligible)  # fp16 |g| of eligible tensors
    assert row["up_bytes"] == 3 * (model_bytes + grad_bytes)
    assert row["down_bytes_dense"] == 3 * state_bytes(state)
    assert dense_round["density"] == 1.0 and dense_round["up_bytes"] == 3 * model_bytes


def test_shared_mask_same_numbers_with_one_or_three_pools_and_after_a_resume(tmp_path,
                                                                           tiny_config):
    """Period 2: rounds 0 and 2 are sparse; the checkpoint after round 2 must carry the summed
    score, or round 3 would start from the dense model after the resume."""
    tree = _lips(tiny_config, 1, mask="shared", gradient="epoch_mean")
    three = assert_pool_count_and_resume_invariant(tree, tmp_path)
    saved = torch.load(next((three / "checkpoints").rglob("*.pt")),
                       weights_only=True)
    assert "lips_score" in saved


def test_shared_mask_and_epoch_mean_change_the_run(tmp_path, tiny_config):
    """Both variants do something: their first sparse hand-out differs from the reference's."""
    held = {}
    for name, lips in {"ref": {}, "shared": {"mask": "shared"},
                       "mean": {"gradient": "epoch_mean"}}.items():
        tree = _lips(tiny_config, **lips)
        tree["train"]["batch_size"] = 10  # four batches an epoch
        run, _ = _one_round(tree, tmp_path / name)
        try:
            held[name] = _held(run)
        finally:
            run.close()
    for variant in ("shared", "mean"):
        assert any(not torch.equal(held["ref"][c][k], held[variant][c][k])
                   for c in held["ref"] for k in held["ref"][c]), variant


# ----- configuration and labels -----------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["magnitude", "random"])
def test_epoch_mean_with_a_scorer_that_reads_no_gradient_is_a_config_error(tiny_config, scorer):
    tree = copy.deepcopy(tiny_config)
    tree["lips"].update(scorer=scorer, gradient="epoch_mean")
    with pytest.raises(ConfigError, match=r"lips\.gradient.*lips\.scorer"):
        validate_config(tree)


def test_shared_mask_with_any_scorer_and_variants_on_dense_runs_are_allowed(tiny_config):
    for scorer in ("sensitivity", "gradient", "magnitude", "random"):
        tree = copy.deepcopy(tiny_config)
        tree["lips"].update(scorer=scorer, mask="shared")
        assert validate_config(tree).lips.mask == "shared"
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm="fedavg", handout="dense")
    tree["lips"].update(mask="shared", gradient="epoch_mean")  # ignored, as every lips key
    assert validate_config(tree).handout == "dense"


def test_shared_mask_refuses_more_clients_than_its_exact_sum_holds(tiny_config):
    tree = copy.deepcopy(tiny_config)
    tree["lips"]["mask"] = "shared"
    tree["data"]["clients"] = 2**15 + 1
    with pytest.raises(ConfigError, match=r"lips\.mask.*data\.clients"):
        validate_config(tree)


def test_reports_tell_the_variants_apart_and_read_older_runs_as_the_reference():
    base = {"algorithm": "fedavg", "handout": "lips", "lips.sparsity": 0.5, "lips.period": 5}
    older = dict(base)  # recorded before the keys existed
    shared = {**base, "lips.mask": "shared", "lips.gradient": "last_batch"}
    mean = {**base, "lips.mask": "per_client", "lips.gradient": "epoch_mean"}
    labels = [m.label for m in label_methods([older, shared, mean])]
    assert labels == [
        "fedavg+lips s=0.5 T=5 gradient=last_batch mask=per_client",
        "fedavg+lips s=0.5 T=5 gradient=last_batch mask=shared",
        "fedavg+lips s=0.5 T=5 gradient=epoch_mean mask=per_client",
    ]
    # runs that all use the defaults keep the labels they always had
    assert [m.label for m in label_methods([older, {**base, "lips.mask": "per_client"}])] == [
        "fedavg+lips s=0.5 T=5"] * 2


@pytest.mark.slow
def test_shared_mask_on_ray_matches_the_in_process_run(ray_local, tmp_path, tiny_config):
    """The summed score travels to the pool actors with the hand-out: the same tables as in
    one process."""

    from ray_lips.cluster.driver import run_on_ray

    tree = copy.deepcopy(tiny_config)
    tree["lips"].update(mask="shared", gradient="epoch_mean")
    cfg = validate_config(tree)
    run_on_ray([("shared", cfg, tmp_path / "ray")])
    run_local(cfg, tmp_path / "local")  # one_thread: as the actors with cpus_per_pool 1
    assert_same_tables(tmp_path / "ray", tmp_path / "local")
