"""FedCAC against known answers: tau 0 is FedAvg, the server's customisation against an
independent re-implementation on hand-made masks, what a client starts from and holds, its
traffic, and the engine's guarantees (pools, resume; serial vs batched groups is checked for
every algorithm, FedCAC included, in tests/test_algorithm_gaps.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from same_runs import assert_same_tables, final_model
from test_body_head_algorithms import _config

from ray_lips.algorithms.base import MODEL
from ray_lips.algorithms.fedcac import CRITICAL, CUSTOM, MASK, FedCAC, critical_mask
from ray_lips.config import ConfigError, validate_config
from ray_lips.core.run import FederatedRun, run_local
from ray_lips.training.spec import LocalSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _fedcac(tiny_config: dict, handout: str = "dense", **knobs) -> dict:
    return _config(tiny_config, "fedcac", handout, fedcac=knobs)


# ----- tau 0: the LIPS authors' setting -------------------------------------------------------
def test_tau_zero_is_fedavg_bit_for_bit(tmp_path, tiny_config):
    run_local(validate_config(_config(tiny_config, "fedavg", "lips")), tmp_path / "fedavg")
    run_local(validate_config(_fedcac(tiny_config, "lips", tau=0.0)), tmp_path / "fedcac")
    assert_same_tables(tmp_path / "fedavg", tmp_path / "fedcac")
    a, b = final_model(tmp_path / "fedavg"), final_model(tmp_path / "fedcac")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_builtin_that_personalises_keeps_what_it_sends_in_a_slot_it_declares():
    from ray_lips.algorithms import registry
    from ray_lips.algorithms.base import Algorithm

    personalising = [cls for cls in registry.builtin().values()
                     if cls.personalise is not Algorithm.personalise]
    assert FedCAC in personalising
    assert all(cls.personalised_slot in cls.client_slots for cls in personalising)


@pytest.mark.parametrize("knobs", [{"tau": -0.1}, {"tau": 1.5}, {"beta": 0}, {"beta": 2.5}])
def test_bad_knobs_are_config_errors_naming_the_key(tiny_config, knobs):
    with pytest.raises(ConfigError, match="fedcac"):
        validate_config(_fedcac(tiny_config, **knobs))


# ----- the server's customisation -------------------------------------------------------------
# Four clients' masks over two tensors, "a" (2x3, 3 critical) and "b" (4, 2 critical); the
# overlaps (of 5 critical entries) are 0-1: 0.8, 0-2: 0, 0-3: 0.6, 1-2: 0.2, 1-3: 0.8, 2-3: 0.4:
# mean 0.4667, max 0.8.
HAND_MASKS = [[1, 1, 1, 0, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 1, 0, 1, 0],
              [0, 0, 0, 1, 1, 1, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0, 1, 0, 1, 0]]
CLIENTS = [2, 5, 7, 9]  # not 0..3: results are keyed by client


def _individual(seed: int = 0) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for client, flat in zip(CLIENTS, HAND_MASKS, strict=True):
        mask = torch.tensor(flat, dtype=torch.bool)
        out[client] = {MODEL: {"a": torch.randn(2, 3, generator=gen),
                               "b": torch.randn(4, generator=gen)},
                       CRITICAL: {"a": mask[:6].view(2, 3), "b": mask[6:]}}
    return out


def _reference(individual, round_idx: int, beta: int) -> dict[int, dict[str, torch.Tensor]]:
    """The reference's formulas, written out: overlap 1 - sum|M_i - M_j| / (2 sum M_i) on the
    concatenated masks, threshold avg + (r + 1) / beta (max - avg), C_i the plain mean."""
    clients = list(individual)
    flat = {c: torch.cat([m.reshape(-1).double() for m in individual[c][CRITICAL].values()])
            for c in clients}
    overlap = {(i, j): 1 - (flat[i] - flat[j]).abs().sum() / (2 * flat[i].sum())
               for i in clients for j in clients if i != j}
    values = torch.stack(list(overlap.values()))
    avg, top = values.mean(), values.max()
    threshold = avg + (round_idx + 1) / beta * (top - avg)
    out = {}
    for i in clients:
        group = [i, *(j for j in clients if j != i and overlap[i, j] >= threshold)]
        out[i] = {}
        for name, mask in individual[i][CRITICAL].items():
            mean = torch.stack([individual[j][MODEL][name].double() for j in group]).mean(0)
            out[i][name] = mean[mask].float()
    return out


def _algorithm(tau: float = 0.5, beta: int = 170) -> FedCAC:
    settings = LocalSettings(epochs=1, batch_size=10, lr=0.1, momentum=0.0, weight_decay=0.0)
    return FedCAC(FedCAC.Options(tau=tau, beta=beta), settings, torch.nn.Linear(3, 2))


@pytest.mark.parametrize(("beta", "round_idx", "groups"), [
    (2, 0, [[0, 1], [1, 0, 3], [2], [3, 1]]),  # threshold 0.633
    (170, 0, [[0, 1, 3], [1, 0, 3], [2], [3, 0, 1]]),  # threshold 0.469
    (2, 5, [[0], [1], [2], [3]]),  # threshold above the max: every client alone
])
def test_customised_models_match_an_independent_reimplementation(beta, round_idx, groups):
    individual = _individual()
    got = _algorithm(beta=beta).personalise(individual, {}, round_idx, {})
    assert list(got) == CLIENTS
    expected = _reference(individual, round_idx, beta)
    for k, client in enumerate(CLIENTS):
        for name, mask in individual[client][CRITICAL].items():
            members = [CLIENTS[g] for g in groups[k]]
            known = (sum(individual[j][MODEL][name].double() for j in members)
                     / len(members))[mask].float()
            assert got[client][name].shape == (int(mask.sum()),)
            torch.testing.assert_close(got[client][name], expected[client][name],
                                       rtol=0, atol=1e-7)
            torch.testing.assert_close(got[client][name], known, rtol=0, atol=1e-7)


def test_clients_whose_overlap_equals_the_threshold_collaborate():
    """Every pair overlaps by exactly half: mean = max = threshold, and each overlap reaches it
    (>=), so every client's customised model is the mean of all three."""
    flats = [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 1]]
    models = [torch.randn(8, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    individual = {c: {MODEL: {"w": models[c]}, CRITICAL: {"w": torch.tensor(f, dtype=torch.bool)}}
                  for c, f in enumerate(flats)}
    got = _algorithm(beta=3).personalise(individual, {}, 0, {})
    mean = (models[0].double() + models[1].double() + models[2].double()) / 3
    for c in range(3):
        torch.testing.assert_close(got[c]["w"], mean[individual[c][CRITICAL]["w"]].float(),
                                   rtol=0, atol=1e-7)


def test_one_participant_keeps_its_own_model():
    individual = {5: _individual()[5]}
    got = _algorithm().personalise(individual, {}, 0, {})
    mask = individual[5][CRITICAL]["a"]
    assert torch.equal(got[5]["a"], individual[5][MODEL]["a"][mask])


def test_critical_parameters_are_the_top_tau_by_sensitivity_ties_to_the_lower_index():
    start = torch.tensor([1.0, 1.0, 2.0, 0.0, 5.0, 3.0])
    after = torch.tensor([2.0, 3.0, 1.0, 0.0, 5.0, 2.0])
    # |(after - start) * after| = 2, 6, 1, 0, 0, 2: the top 3 are 6, then 2 at index 0 and 5
    assert critical_mask(start, after, 3).tolist() == [True, True, False, False, False, True]
    assert critical_mask(start, after, 2).tolist() == [True, True, False, False, False, False]
    assert not critical_mask(start, after, 0).any()


# ----- the client side --------------------------------------------------------------------------
@pytest.mark.parametrize("handout", ["dense", "lips"])
def test_a_client_starts_from_its_critical_entries_customised_and_the_rest_as_handed(
        tmp_path, tiny_config, handout):
    tree = _fedcac(tiny_config, handout)
    tree["lips"]["period"] = 1  # every hand-out sparse
    run = FederatedRun(validate_config(tree), tmp_path / "run")
    try:
        pool = run.pools.pools[0]
        starts = {}
        train = pool.trainer.train

        def recording(batch, round_idx, evaluate=False):
            starts.update((job.client, job.start) for job in batch)
            return train(batch, round_idx, evaluate)

        pool.trainer.train = recording
        initial = dict(run.global_state)
        run.run_round()
        assert starts and all(all(torch.equal(s[k], initial[k]) for k in s)  # no mask yet
                              for s in starts.values())
        view = pool.view()
        held = {c: pool.algorithm.held_state(view, c) for c in pool.clients()}
        sparse = False
        for client in pool.clients():
            mask, values = pool.store.get(client, MASK), pool.store.get(client, CUSTOM)
            handed = pool.handed(client)
            for name, tensor in handed.items():
                if name in mask:
                    critical = mask[name]
                    assert critical.sum() == math.floor(0.5 * tensor.numel())
                    assert torch.equal(held[client][name][critical], values[name])
                    assert torch.equal(held[client][name][~critical], tensor[~critical])
                else:  # BatchNorm statistics, buffers: the global model's, as handed
                    assert torch.equal(held[client][name], tensor)
                sparse |= not torch.equal(tensor, run.global_state[name])
        assert sparse == (handout == "lips")
        starts.clear()
        run.run_round()
        for client, start in starts.items():
            assert all(torch.equal(start[k], held[client][k]) for k in start)
    finally:
        run.close()


def test_traffic_adds_the_mask_bitmap_up_and_the_customised_values_down(tmp_path, tiny_config):
    run_local(validate_config(_fedcac(tiny_config, tau=0.0)), tmp_path / "plain")
    run_local(validate_config(_fedcac(tiny_config)), tmp_path / "fedcac")
    plain = pd.read_parquet(tmp_path / "plain" / "rounds.parquet")
    cac = pd.read_parquet(tmp_path / "fedcac" / "rounds.parquet")
    cfg = validate_config(_fedcac(tiny_config))
    run = FederatedRun(cfg, tmp_path / "shapes")
    params = dict(run.pools.pools[0].model.named_parameters())
    run.close()
    keep = {n: math.floor(0.5 * p.numel()) for n, p in params.items()}
    bits = sum(math.ceil(p.numel() / 8) for n, p in params.items() if keep[n] > 0)
    values = 4 * sum(keep.values())  # float32 values at the critical positions
    clients = cfg.data.clients
    assert (cac["up_bytes"] - plain["up_bytes"] == clients * bits).all()
    assert (cac["down_bytes"] - plain["down_bytes"] == clients * values).all()
    assert (cac["down_bytes_dense"] - plain["down_bytes_dense"] == clients * values).all()


# ----- the engine's guarantees ------------------------------------------------------------------
def test_same_numbers_with_one_or_three_pools_and_after_a_resume_with_lips_and_half_the_clients(
        tmp_path, tiny_config):
    tree = _fedcac(tiny_config, "lips")
    tree["train"].update(participation=0.5, rounds=4)
    tree["resources"]["pools"] = 1
    run_local(validate_config(tree), tmp_path / "one")
    tree["resources"]["pools"] = 3
    cfg = validate_config(tree)
    run_local(cfg, tmp_path / "three")
    assert_same_tables(tmp_path / "one", tmp_path / "three")
    # interrupted after round 3 (last checkpoint after round 2), then resumed
    stopped = FederatedRun(cfg, tmp_path / "resumed")
    stopped.run_round()
    stopped.run_round()  # checkpoint
    kept = {(slot, c): pool.store.get(c, slot) for pool in stopped.pools.pools
            for c in pool.clients() for slot in (MASK, CUSTOM)}
    stopped.run_round()
    stopped.close()
    assert any(entry is not None for entry in kept.values())
    back = FederatedRun(cfg, tmp_path / "resumed")
    assert back.round == 2
    for (slot, client), entry in kept.items():
        pool = next(p for p in back.pools.pools if client in p.clients())
        again = pool.store.get(client, slot)
        assert (again is None) == (entry is None), (slot, client)
        assert entry is None or all(torch.equal(entry[k], again[k]) for k in entry)
    back.close()
    run_local(cfg, tmp_path / "resumed")
    assert_same_tables(tmp_path / "three", tmp_path / "resumed")
    a, b = final_model(tmp_path / "three"), final_model(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fedcac_with_lips_on_ray_matches_the_in_process_run(ray_local, tmp_path, tiny_config):
    """Masks travel up and customised values down through Ray's pool actors unchanged."""
    from ray_lips.cluster.driver import run_on_ray

    cfg = validate_config(_fedcac(tiny_config, "lips"))
    run_on_ray([("fedcac", cfg, tmp_path / "ray")])
    run_local(cfg, tmp_path / "local")  # one thread (one_thread), as the pool actors
    assert_same_tables(tmp_path / "ray", tmp_path / "local")
