"""Batched client training equals one-at-a-time training, and does not depend on grouping."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ray_lips.config import validate_config
from ray_lips.core.aggregate import FRACTION_BITS, to_state
from ray_lips.core.run import build_payloads, initial_model
from ray_lips.models import build_model, eligible_parameter_names
from ray_lips.pools.client_pool import ClientPool, batch_clients
from ray_lips.pools.messages import HandoutRequest, TrainRequest
from ray_lips.pools.payload import ClientShard, PackedShards, PoolPayload
from ray_lips.training import local as training
from ray_lips.training.batched import ClientGroup, supports
from ray_lips.training.local import Correction, LocalSettings, Normalisation, local_train

SETTINGS = LocalSettings(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4)
# Float64 training by the two paths agrees to float64 rounding (1e-16) as a few SGD steps carry
# it on: at most 1.7e-14 relative on every kernel set measured (benchmarks/README.md), far
# below float32's 6e-8 that any float32 step on either side would show.
FLOAT64_RTOL = 1e-10
# The reported loss is each step's loss summed in float32: float64 losses that agree to ~1e-15
# convert to the same float32 value unless one sits on a rounding boundary, then one float32
# step (2^-23 relative) apart, which the sum carries: a few steps of 2^-23.
FLOAT32_LOSS_REL = 8 * 2.0**-23
CASES = {  # model, sample shape, samples per client (30 = 16 + a partial batch of 14)
    "smallcnn": ("smallcnn", (3, 16, 16), 30),
    "resnet8": ("resnet8", (3, 16, 16), 30),
    "resnet8_1d": ("resnet8_1d", (1, 40), 30),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as a pool actor with one CPU: small ops stay fast even when other
    processes keep the cores busy (OpenMP barriers then wait for descheduled threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generators(client: int) -> tuple[torch.Generator, torch.Generator]:
    return (torch.Generator().manual_seed(100 + client),
            torch.Generator().manual_seed(200 + client))


def _setup(name: str, clients: int, seed: int = 0):
    model_name, shape, n = CASES[name]
    torch.manual_seed(seed)
    model = build_model(model_name, shape, 10)
    base = model.state_dict()
    # Client-specific start states, as in a LIPS sparsity round; BN counters differ too.
    starts = [{k: (v + 0.02 * c * torch.randn_like(v) if v.is_floating_point() else v + c)
               for k, v in base.items()} for c in range(clients)]
    x = torch.randn(clients, n, *shape)
    y = torch.randint(0, 10, (clients, n))
    norm = Normalisation(mean=(0.1,) * shape[0], std=(0.9,) * shape[0], augment=len(shape) == 3)
    return model, starts, x, y, norm


def _serial(model, starts, x, y, norm, settings, remember):
    out = []
    for c in range(len(starts)):
        model.load_state_dict(starts[c])
        result = local_train(model, x[c], y[c], settings, norm, *_generators(c),
                             remember=remember)
        out.append((result, copy.deepcopy(model.state_dict())))
    return out


def _batched(model, starts, x, y, norm, settings, remember, members=None, channels_last=True,
             slots=None):
    members = list(range(len(starts))) if members is None else members
    group = ClientGroup(model, slots or len(members), channels_last=channels_last)
    padded = members + [members[0]] * (group.clients - len(members))
    group.load([starts[c] for c in padded])
    gens = [_generators(c) for c in padded]
    results = group.train(x[padded], y[padded], settings, norm, [g[0] for g in gens],
                          [g[1] for g in gens], remember=remember)
    states = group.states()
    return {c: (results[k], {n: t.clone() for n, t in states[k].items()})
            for k, c in enumerate(members)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def _float64(model, starts, x):
    return (model.double(), [{k: v.double() if v.is_floating_point() else v
                              for k, v in s.items()} for s in starts], x.double())


def _same_layout_reference(monkeypatch, model, channels_last):
    """``local_train`` in the layout the group uses: channels-last kernels round differently
    from NCHW ones, so each layout is compared with its own serial reference."""
    if not channels_last:
        return model
    prepare = training.prepare_batch

    def channels_last_batch(*args, **kwargs):
        batch = prepare(*args, **kwargs)
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch

    monkeypatch.setattr(training, "prepare_batch", channels_last_batch)
    return model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_a_batched_group_trains_each_client_exactly_like_local_train_in_float64(
        name, channels_last, monkeypatch):
    """The equivalence itself, where rounding cannot decide the outcome: four SGD steps (two
    epochs, a full and a partial batch each) in float64 agree to ~1e-15. In float32 the two
    paths run different kernels (grouped vs dense convolutions) whose last-bit differences
    depend on the CPU's vector unit, and a max-pool near-tie can then route a gradient to the
    other input: that is a property of float32 on a given CPU, not of the batched path."""
    model, starts, x, y, norm = _setup(name, clients=3)
    model, starts, x = _float64(model, starts, x)
    model = _same_layout_reference(monkeypatch, model, channels_last)
    remember = eligible_parameter_names(model)
    serial = _serial(model, starts, x, y, norm, SETTINGS, remember)
    batched = _batched(model, starts, x, y, norm, SETTINGS, remember,
                       channels_last=channels_last)
    for c, (expected, state) in enumerate(serial):
        result, got = batched[c]
        assert result.steps == expected.steps == 4
        assert result.loss == pytest.approx(expected.loss, rel=FLOAT32_LOSS_REL)
        for key, value in state.items():
            if value.is_floating_point():
                assert got[key].dtype == torch.float64
                assert _rel(value, got[key]) < FLOAT64_RTOL, (c, key, _rel(value, got[key]))
            else:  # num_batches_tracked: start + steps, per client
                assert torch.equal(value, got[key]), (c, key)
        for key in remember:  # stored in fp16 as the reference does: one fp16 step at most
            assert result.last_grads[key].dtype == torch.float16
            assert _rel(expected.last_grads[key], result.last_grads[key]) <= 2.0**-10, (c, key)


@pytest.mark.parametrize("name", ["smallcnn", "resnet8"])
def test_gradient_corrections_train_alike_in_both_paths_in_float64(name):
    """Every algorithm's local objective is a gradient correction (FedProx's proximal pull,
    SCAFFOLD's control variates, Ditto's personal term): per client, different anchors and
    offsets, the same coefficient, as the pools pass them."""
    model, starts, x, y, norm = _setup(name, clients=3)
    model, starts, x = _float64(model, starts, x)
    gen = torch.Generator().manual_seed(7)
    params = [n for n, _ in model.named_parameters()]
    corrections = [Correction(
        coef=0.3, anchor={n: starts[(c + 1) % 3][n] for n in params},
        offset={n: 0.01 * torch.randn(starts[c][n].shape, generator=gen, dtype=torch.float64)
                for n in params[::2]}) for c in range(3)]
    corrections[2] = Correction(coef=0.3, anchor={n: starts[0][n] for n in params})
    serial = []
    for c in range(3):
        model.load_state_dict(starts[c])
        local_train(model, x[c], y[c], SETTINGS, norm, *_generators(c),
                    correction=corrections[c])
        serial.append(copy.deepcopy(model.state_dict()))
    group = ClientGroup(model, 3, channels_last=False)
    group.load(starts)
    gens = [_generators(c) for c in range(3)]
    group.train(x, y, SETTINGS, norm, [g[0] for g in gens], [g[1] for g in gens],
                corrections=corrections)
    uncorrected = _serial(model, starts, x, y, norm, SETTINGS, None)
    for c, state in enumerate(group.states()):
        for key, value in serial[c].items():
            if value.is_floating_point():
                assert _rel(value, state[key]) < FLOAT64_RTOL, (c, key)
        moved = max(_rel(uncorrected[c][1][k], serial[c][k]) for k in params)
        assert moved > 1e-3  # the correction changed the training


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_a_float32_group_trains_in_float32_and_counts_its_steps(name, channels_last,
                                                                monkeypatch):
    """The float32 path as pools run it, checked where rounding cannot decide: the dtypes,
    the steps, the BatchNorm step counters and that every client trained. Its values are
    compared with ``local_train``'s in float64 above: in float32 the two paths run different
    kernels (grouped vs dense convolutions, bmm vs addmm) whose last bits depend on the CPU's
    vector unit and thread count, and a max-pool near-tie can route a gradient elsewhere
    already in the first step (benchmarks/kernel_rounding.py), so no float32 tolerance would
    hold on every x86-64 CPU."""
    model, starts, x, y, norm = _setup(name, clients=3)
    model = _same_layout_reference(monkeypatch, model, channels_last)
    one_step = LocalSettings(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=5e-4)
    remember = eligible_parameter_names(model)
    serial = _serial(model, starts, x, y, norm, one_step, remember)
    batched = _batched(model, starts, x, y, norm, one_step, remember,
                       channels_last=channels_last)
    for c, (expected, state) in enumerate(serial):
        result, got = batched[c]
        assert result.steps == expected.steps == 1
        assert math.isfinite(result.loss)
        assert got.keys() == state.keys()
        for key, value in state.items():
            assert got[key].dtype == value.dtype == starts[c][key].dtype, (c, key)
            if not value.is_floating_point():  # num_batches_tracked: start + steps
                assert torch.equal(value, got[key]), (c, key)
        assert all(not torch.equal(got[k], starts[c][k]) for k in remember), c
        for key in remember:
            assert result.last_grads[key].dtype == torch.float16


def test_channels_last_input_holds_the_same_values_as_nchw():
    model, starts, x, y, norm = _setup("smallcnn", clients=3)
    samples = x[:, :7].reshape(21, *x.shape[2:])
    gens = [torch.Generator().manual_seed(c) for c in range(3)]
    nchw = ClientGroup(model, 3, channels_last=False)._inputs(samples, norm, gens)
    gens = [torch.Generator().manual_seed(c) for c in range(3)]
    nhwc = ClientGroup(model, 3, channels_last=True)._inputs(samples, norm, gens)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, nhwc)
    assert nchw.shape == (7, 9, 16, 16)
    # client 1's channels are its own samples, prepared as local_train prepares them
    from ray_lips.data.augment import prepare_batch

    own = prepare_batch(x[1, :7], norm.mean, norm.std, augment=True,
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(nchw[:, 3:6], own)


def test_a_clients_result_does_not_depend_on_its_slot_or_its_neighbours():
    model, starts, x, y, norm = _setup("smallcnn", clients=8)
    remember = eligible_parameter_names(model)
    first = _batched(model, starts, x, y, norm, SETTINGS, remember, members=[0, 1, 2, 3, 4])
    for members in ([7, 6, 0, 5, 4], [5, 6, 7, 1, 0], [0]):
        other = _batched(model, starts, x, y, norm, SETTINGS, remember, members=members,
                         slots=5)
        result, state = other[0]
        assert result.loss == first[0][0].loss
        for key, value in first[0][1].items():
            assert torch.equal(value, state[key]), (members, key)
        for key in remember:
            assert torch.equal(first[0][0].last_grads[key], result.last_grads[key])


def test_per_client_gradient_clipping_matches_local_train():
    settings = LocalSettings(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0,
                             grad_clip=0.5)
    model, starts, x, y, norm = _setup("smallcnn", clients=3)
    model, starts, x = _float64(model, starts, x)  # exact comparison, as above
    serial = _serial(model, starts, x, y, norm, settings, None)
    batched = _batched(model, starts, x, y, norm, settings, None, channels_last=False)
    for c, (_, state) in enumerate(serial):
        for key, value in state.items():
            if value.is_floating_point():
                assert _rel(value, batched[c][1][key]) < FLOAT64_RTOL, key


def test_bf16_precision_trains_in_both_modes():
    """bf16 autocast takes effect on both paths (the losses differ from fp32's, which needs
    only bf16's 8-bit mantissa) and keeps float32 master weights. The two paths' bf16 values
    are not compared: they run different kernels, each rounding to bf16 in its own places."""
    model, starts, x, y, norm = _setup("smallcnn", clients=2)
    runs = {}
    for precision in ("fp32", "bf16"):
        settings = LocalSettings(epochs=1, batch_size=16, lr=0.05, momentum=0.9,
                                 weight_decay=0.0, precision=precision)
        serial = _serial(model, starts, x, y, norm, settings, None)
        batched = _batched(model, starts, x, y, norm, settings, None)
        runs[precision] = {"serial": [serial[c] for c in range(2)],
                           "batched": [batched[c] for c in range(2)]}
    for path in ("serial", "batched"):
        for c in range(2):
            (bf16, state), (fp32, _) = runs["bf16"][path][c], runs["fp32"][path][c]
            assert math.isfinite(bf16.loss) and bf16.loss != fp32.loss, (path, c)
            for key, value in state.items():
                assert value.dtype == starts[c][key].dtype, (path, c, key)


def test_models_that_mix_channels_are_not_batched():
    class Shuffle(nn.Module):
        def forward(self, x):
            return x.flip(1)

    assert supports(build_model("vgg11_bn", (3, 8, 8), 10))
    assert not supports(nn.Sequential(nn.Conv2d(3, 4, 3), Shuffle(), nn.Flatten()))


# ----- through the pool ---------------------------------------------------------------------
@pytest.fixture
def groups_of(monkeypatch):
    """Make pools use groups of ``n`` clients (on CPU they default to 1)."""
    import ray_lips.pools.client_pool

    def use(n: int) -> None:
        monkeypatch.setattr(ray_lips.pools.client_pool, "batch_clients", lambda cfg, device: n)

    return use


def _in_float64(pool: ClientPool) -> ClientPool:
    """The pool's model and data in float64, so that serial and batched training can be
    compared where kernel rounding cannot decide the outcome (see the float64 test above)."""
    pool.model.double()
    for client, shard in pool.shards.items():
        pool.shards[client] = ClientShard(client, shard.x_train.double(), shard.y_train,
                                          shard.x_test.double(), shard.y_test)
    if pool.test_split is not None:
        pool.test_split = (pool.test_split[0].double(), pool.test_split[1])
    return pool


def _pool_pair(tiny_config, **train):
    tiny_config["train"].update(train)
    tiny_config["resources"]["pools"] = 1
    cfg = validate_config(tiny_config)
    from ray_lips.data import load_dataset

    dataset = load_dataset(cfg.data)
    payload = build_payloads(cfg, dataset, [list(range(cfg.data.clients))])[0]
    # the shards materialised, so that _in_float64 can replace them
    payload = replace(payload, data=PackedShards.from_shards(payload.shards), dataset=None)
    model = initial_model(cfg, tuple(dataset.sample_shape), dataset.num_classes).double()
    state = model.state_dict()
    pools = []
    for batched in (False, True):
        tree = cfg.to_dict()
        tree["train"]["batched"] = batched
        pools.append(_in_float64(ClientPool(validate_config(tree), payload)))
    return cfg, pools, state


def _assert_same_sums(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                     clients: int) -> None:
    """Two pools' averages of the same clients trained in float64 by the two paths: each
    client's model agrees to float64 rounding carried through a round (FLOAT64_RTOL), and
    the pool rounds each weighted model to the 2^-32 grid, where two values that close land
    on the same multiple unless they straddle a rounding boundary: one grid step per client."""
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[key], value, rtol=FLOAT64_RTOL,
                                       atol=clients * 2.0**-FRACTION_BITS, msg=key)
        else:
            assert torch.equal(value, b[key]), key


def test_pool_rounds_match_in_both_modes_including_the_lips_handout(tiny_config, groups_of):
    groups_of(3)  # 4 participants: a full group and one padded with two throw-away copies
    cfg, pools, state = _pool_pair(tiny_config, batch_size=16)  # 40 = 16 + 16 + 8
    assert [p.batched for p in pools] == [False, True]
    participants = [0, 2, 3, 5]

    def train(round_idx: int):
        return [pool.train_round(TrainRequest(round_idx, participants, 160, 240, True), {})
                for pool in pools]

    def own(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in tensors.items()}

    for pool in pools:
        pool.set_global(-1, own(state), 1.0)
    first = train(0)
    # Both pools go on from the same global model (the serial pool's), so each round is
    # compared from one start: the sparse hand-out from each client's own stored gradient.
    after_first = to_state(first[0].sums["model"], state)
    for pool in pools:
        pool.set_global(0, own(after_first), 0.5)
    sparse = [{c: pool.handed(c) for c in participants} for pool in pools]
    second = train(1)
    after_second = to_state(second[0].sums["model"], state)
    handed = [pool.handout(HandoutRequest(1, 0.5, participants, True), own(after_second))
              for pool in pools]
    grads = [{c: pool.store.get(c, "lips.grad") for c in participants} for pool in pools]

    e0, e1 = handed
    # accuracies are counts over the test samples: equal unless a float64 logit tie flips
    assert e0.acc_test == e1.acc_test  # the global model on the test split, in both
    for ra, rb in zip(e0.clients, e1.clients, strict=True):
        assert ra["client"] == rb["client"] and set(ra) == set(rb)
        assert ra["acc_global"] == pytest.approx(rb["acc_global"], abs=1e-9)
        assert ra["acc_after"] == pytest.approx(rb["acc_after"], abs=1e-9)
    for a, b in (first, second):
        assert [r["client"] for r in a.clients] == [r["client"] for r in b.clients]
        for ra, rb in zip(a.clients, b.clients, strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=FLOAT32_LOSS_REL)
            assert rb["acc_before"] == pytest.approx(ra["acc_before"], abs=1e-9)
        _assert_same_sums(to_state(a.sums["model"], state), to_state(b.sums["model"], state),
                          len(participants))
    for c in participants:
        for key in pools[0].eligible:
            # Masks rank |g * w| with g stored in fp16 (as the reference): g agrees to float64
            # rounding in both modes, so its fp16 values are equal but where one sits on an
            # fp16 rounding boundary, and then one fp16 step (2^-10 relative) apart.
            assert torch.equal(sparse[0][c][key] == 0, sparse[1][c][key] == 0), (c, key)
            assert _rel(grads[0][c][key], grads[1][c][key]) <= 2.0**-10, (c, key)


def test_clients_with_different_sample_counts_train_in_their_own_groups(tiny_config, groups_of):
    groups_of(3)
    tiny_config["resources"]["pools"] = 1
    cfg = validate_config(tiny_config)
    torch.manual_seed(0)
    shards = [ClientShard(c, torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,)),
                          torch.rand(10, 1, 8, 8), torch.randint(0, 10, (10,)))
              for c, n in enumerate([40, 24, 40, 24, 17, 40])]
    payload = PoolPayload(0, PackedShards.from_shards(shards),
                          Normalisation((0.5,), (0.3,), False), (1, 8, 8), 10)
    serial_tree, batched_tree = cfg.to_dict(), cfg.to_dict()
    serial_tree["train"]["batched"], batched_tree["train"]["batched"] = False, True
    serial = _in_float64(ClientPool(validate_config(serial_tree), payload))
    batched = _in_float64(ClientPool(validate_config(batched_tree), payload))
    assert batched.plan_groups(list(range(6))) == [[0, 2, 5], [1, 3], [4]]
    model = build_model(cfg.model, (1, 8, 8), 10).double()
    for pool in (serial, batched):
        pool.set_global(-1, model.state_dict(), 1.0)
    total = sum(s.x_train.shape[0] for s in shards)
    a = serial.train_round(TrainRequest(0, list(range(6)), total, total, False), {})
    b = batched.train_round(TrainRequest(0, list(range(6)), total, total, False), {})
    for ra, rb in zip(a.clients, b.clients, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=FLOAT32_LOSS_REL)
    _assert_same_sums(to_state(a.sums["model"], model.state_dict()),
                      to_state(b.sums["model"], model.state_dict()), len(shards))


@pytest.mark.parametrize("group", [1, 4])
def test_batched_runs_give_the_same_numbers_with_one_or_three_pools(tmp_path, tiny_config,
                                                                    groups_of, group):
    import pandas as pd

    from ray_lips.core.run import run_local

    groups_of(group)  # 6 clients: 1 pool has groups of 4 + 2; 3 pools, groups of 2 (padded)

    tiny_config["train"].update(batched=True, rounds=3)
    frames = []
    for pools in (1, 3):
        tiny_config["resources"]["pools"] = pools
        run_local(validate_config(tiny_config), tmp_path / f"p{pools}")
        frames.append({name: pd.read_parquet(tmp_path / f"p{pools}" / name)
                       .drop(columns="seconds", errors="ignore")
                       for name in ("rounds.parquet", "layers.parquet", "clients.parquet")})
    for name, frame in frames[0].items():
        pd.testing.assert_frame_equal(frame, frames[1][name], check_exact=True)


def test_group_size_comes_from_the_config_and_the_device_not_the_pool(tiny_config):
    tiny_config["data"]["clients"] = 100
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = validate_config(tiny_config)
    assert batch_clients(cfg, cpu) == 1
    assert batch_clients(cfg, cuda) == 25  # 100 participants, at most 32 a group: 4 of 25
    tiny_config["train"]["participation"] = 0.1
    assert batch_clients(validate_config(tiny_config), cuda) == 10
    if "batch_clients" in type(cfg.train).model_fields:
        tiny_config["train"]["batch_clients"] = 16
        assert batch_clients(validate_config(tiny_config), cpu) == 10
