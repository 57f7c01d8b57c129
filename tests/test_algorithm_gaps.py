"""Behaviour of the algorithms that was correct but unpinned: SCAFFOLD's |S|/N factor under
partial participation, Ditto's anchor, and every algorithm in batched groups of more than one
client against one at a time."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from ray_lips.algorithms import registry
from ray_lips.algorithms.ditto import PERSONAL
from ray_lips.algorithms.scaffold import CLIENT_CONTROL
from ray_lips.config import validate_config
from ray_lips.core.aggregate import FRACTION_BITS, to_state
from ray_lips.core.run import FederatedRun, build_payloads, initial_model
from ray_lips.pools.client_pool import ClientPool
from ray_lips.pools.messages import HandoutRequest, TrainRequest
from ray_lips.pools.payload import ClientShard, PackedShards

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _config(tiny_config: dict, algorithm: str, **sections) -> dict:
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm=algorithm, handout="dense", **sections)
    tree["train"].update(rounds=3, local_epochs=1, finetune_epochs=0, checkpoint_every=3)
    return tree


# ----- SCAFFOLD: c is the sample-weighted mean of every client's c_i ----------------------------
def test_scaffold_server_control_is_the_mean_over_all_clients_under_partial_participation(
        tmp_path, tiny_config):
    """Half the clients a round: the server adds each participant's Δc_i with weight n_i / N
    (all clients' samples), so c stays the sample-weighted mean of all c_i, absent ones (still
    zero, or as they last left it) included. With |S| participants' weights it would not."""
    tree = _config(tiny_config, "scaffold")
    tree["train"]["participation"] = 0.5  # 3 of 6 clients a round
    run = FederatedRun(validate_config(tree), tmp_path / "run")
    for r in range(3):
        run.run_round()
        controls = {c: pool.store.get(c, CLIENT_CONTROL)
                    for pool in run.pools.pools for c in pool.clients()}
        trained = {c for c, kept in controls.items() if kept is not None}
        assert len(trained) == 3 if r == 0 else len(trained) >= 3
        population = sum(run.samples.values())
        for name, c in run.server_state.items():
            # the expected mean in float64, from the very c_i the server's c was summed from:
            # whatever kernels trained them, the two sides differ only by c's float32 sums
            # (a few ulps a round over 3 rounds), far inside rtol 1e-5 (~80 float32 ulps)
            mean = sum(run.samples[k] / population * kept[name].double()
                       for k, kept in controls.items() if kept is not None)
            torch.testing.assert_close(c.double(), mean, rtol=1e-5, atol=1e-6, msg=name)
        participants_only = {
            name: sum(kept[name] for kept in controls.values() if kept is not None)
            / len(trained) for name in run.server_state}
        if len(trained) < 6:  # absent clients count: not the mean over those that trained
            assert any(not torch.allclose(run.server_state[n], participants_only[n],
                                          rtol=1e-3, atol=1e-5) for n in participants_only)
    run.close()


# ----- Ditto: the personal objective pulls towards this round's global model --------------------
def test_ditto_anchors_the_personal_model_at_this_rounds_global_model(tmp_path, tiny_config):
    run = FederatedRun(validate_config(_config(tiny_config, "ditto")), tmp_path / "run")
    jobs = []
    for pool in run.pools.pools:
        train = pool.trainer.train

        def recording(batch, round_idx, evaluate=False, train=train):
            jobs.extend((round_idx, job) for job in batch if job.stream == "personal")
            return train(batch, round_idx, evaluate)

        pool.trainer.train = recording
    previous = run.global_state
    run.run_round()
    this = run.global_state  # the model the pools hold for round 1
    personal = {c: dict(pool.store.get(c, PERSONAL)) for pool in run.pools.pools
                for c in pool.clients()}
    jobs.clear()
    run.run_round()
    assert sorted(job.client for _, job in jobs) == sorted(personal)
    params = [n for n in run.pools.pools[0].algorithm.parameter_names]
    for round_idx, job in jobs:
        anchor = job.correction.anchor
        assert round_idx == 1 and job.correction.coef == 0.1
        assert all(torch.equal(anchor[n].cpu(), this[n]) for n in params)
        assert not all(torch.equal(anchor[n].cpu(), previous[n]) for n in params)
        assert all(torch.equal(job.start[n].cpu(), personal[job.client][n]) for n in params)
        assert not all(torch.equal(anchor[n].cpu(), personal[job.client][n]) for n in params)
    run.close()


# ----- every algorithm: batched groups against one client at a time, in float64 ------------------
# Knobs that give each algorithm's correction or personal part something to do.
KNOBS = {"fedprox": {"mu": 0.1}, "ditto": {"lam": 0.5}, "feddyn": {"alpha": 0.1},
         "scaffold": {"server_lr": 1.0}}
VARIANTS = [(name, KNOBS.get(name, {})) for name in registry.names()] + [
    ("fedprox", {"mu": 0.1, "anchor": "global"}),
    ("fedper", {"personal_layers": 2, "local_bn": True}),
]
# Float64 paths agree to ~1e-15 per step (tests/test_batched.py); each round rounds every
# client's weighted model to the 2^-32 grid, where two values that close land on the same
# multiple unless they straddle a boundary (one step per client), which later rounds carry on.
ATOL = 4 * 6 * 2.0**-FRACTION_BITS
RTOL = 1e-10


def _in_float64(pool: ClientPool) -> ClientPool:
    pool.model.double()
    for client, shard in pool.shards.items():
        pool.shards[client] = ClientShard(client, shard.x_train.double(), shard.y_train,
                                          shard.x_test.double(), shard.y_test)
    if pool.test_split is not None:
        pool.test_split = (pool.test_split[0].double(), pool.test_split[1])
    return pool


def _run_rounds(pool: ClientPool, state: dict, rounds: list[list[int]]):
    """The driver's side of ``rounds`` over one pool that hosts every client: train, aggregate
    with the pool's algorithm, hand out. Returns per round the global state, the training rows
    and the hand-out rows, and at the end the model each client holds."""
    alg = pool.algorithm
    server = alg.init_server_state(state)
    population = sum(pool.samples(c) for c in pool.clients())
    pool.set_global(-1, state, 1.0)
    out = []
    for r, participants in enumerate(rounds):
        total = sum(pool.samples(c) for c in participants)
        reply = pool.train_round(TrainRequest(r, participants, total, population, True),
                                 alg.server_message(server))
        averages = {part: to_state(sums, {k: state[k] for k in sums})
                    for part, sums in reply.sums.items()}
        state, server = alg.aggregate(state, averages, server)
        personal = (alg.personalise(dict(sorted(reply.individual.items())), state, r, server)
                    if reply.individual else {})
        handed = pool.handout(HandoutRequest(r, 1.0, pool.clients(), False,
                                             personal=personal), state)
        out.append((state, reply.clients, handed.clients))
    held = {c: {k: v.clone() for k, v in alg.held_state(pool.view(), c).items()}
            for c in pool.clients()}
    return out, held


def _close(a: dict, b: dict, what) -> None:
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[key], value, rtol=RTOL, atol=ATOL, msg=(what, key))
        else:
            assert torch.equal(value, b[key]), (what, key)


@pytest.mark.parametrize(("algorithm", "knobs"), VARIANTS,
                         ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                              for a, o in VARIANTS])
def test_every_algorithm_trains_alike_in_batched_groups_and_one_at_a_time(tiny_config,
                                                                         algorithm, knobs):
    tree = _config(tiny_config, algorithm, **({algorithm: knobs} if knobs else {}))
    tree["train"].update(batch_size=16, batch_clients=3)  # 40 samples: 16 + 16 + 8
    tree["resources"]["pools"] = 1
    cfg = validate_config(tree)
    from ray_lips.data import load_dataset

    dataset = load_dataset(cfg.data)
    payload = build_payloads(cfg, dataset, [list(range(cfg.data.clients))])[0]
    payload = replace(payload, data=PackedShards.from_shards(payload.shards), dataset=None)
    model = initial_model(cfg, tuple(dataset.sample_shape), dataset.num_classes).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # groups of 3 (one padded), then every client (two full groups), then a group of 2
    rounds = [[0, 2, 3, 5], [0, 1, 2, 3, 4, 5], [1, 4]]
    results = []
    for batched in (False, True):
        mode = cfg.to_dict()
        mode["train"]["batched"] = batched
        pool = _in_float64(ClientPool(validate_config(mode), payload))
        assert pool.batched == batched and pool.group_size == (3 if batched else 1)
        results.append(_run_rounds(pool, dict(state), rounds))
    (serial, serial_held), (batched, batched_held) = results
    for r, ((sa, ta, ha), (sb, tb, hb)) in enumerate(zip(serial, batched, strict=True)):
        _close(sa, sb, f"global state after round {r}")
        for ra, rb in zip(ta + ha, tb + hb, strict=True):
            assert ra.keys() == rb.keys() and ra["client"] == rb["client"]
            for key in ra.keys() - {"client", "loss"}:  # accuracies: counts over n, in float64
                assert rb[key] == pytest.approx(ra[key], abs=1e-9, nan_ok=True), (r, key)
            if "loss" in ra:
                assert rb["loss"] == pytest.approx(ra["loss"], rel=8 * 2.0**-23), r
    for client, held in serial_held.items():
        _close(held, batched_held[client], f"model client {client} holds")
