"""Client state reaches a checkpoint part by part, from the pools straight to disk, and comes
back from the parts into any number of pools; damaged or crafted parts are never used."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from ray import tune

from ray_lips.cluster.tune_trial import adopt_checkpoint, pack_checkpoint
from ray_lips.config import validate_config
from ray_lips.core import run as experiment
from ray_lips.core.run import FederatedRun
from ray_lips.core.run_folder import CheckpointError, RunWriter, client_state_folder
from ray_lips.pools.client_pool import ClientPool
from ray_lips.pools.messages import StatePartRequest

SLOT = "scaffold.c"


def _scaffold(tiny_config: dict, pools: int = 3) -> dict:
    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm="scaffold", handout="dense")
    tree["train"].update(rounds=4, local_epochs=1, checkpoint_every=1, eval_every=2)
    tree["resources"]["pools"] = pools
    return tree


def _state(run: FederatedRun) -> dict[int, dict[str, torch.Tensor]]:
    """Every client's control variate, read through the pools' own export."""
    requests = [StatePartRequest([(info.slot, info.client) for info in own])
                for own in run.pools.state_index()]
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for reply in run.pools.save_state(requests):
        merged.update(reply.entries.get(SLOT, {}))
    return merged


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for client in a:
        assert set(a[client]) == set(b[client])
        assert all(torch.equal(a[client][k], b[client][k]) for k in a[client])


def _run_rounds(cfg, run_dir, rounds: int) -> dict:
    run = FederatedRun(cfg, run_dir)
    for _ in range(rounds):
        run.run_round()
    state = _state(run)
    run.close()
    return state


def test_client_state_goes_to_disk_in_bounded_parts_and_back_into_any_pool_count(
        tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr(experiment, "STATE_PART_BYTES", 1)  # every entry is a part of its own
    state = _run_rounds(validate_config(_scaffold(tiny_config, pools=3)), tmp_path / "run", 2)
    assert len(state) == tiny_config["data"]["clients"]

    main = tmp_path / "run" / "checkpoints" / "round_00001.pt"
    held = torch.load(main, weights_only=True)
    assert "client_state" not in held  # the driver's file holds no client tensors
    parts = sorted(client_state_folder(main).glob("*.pt"))
    assert held["client_state_parts"] == [p.stat().st_size for p in parts]
    contents = [torch.load(p, weights_only=True) for p in parts]
    assert all(len(part[SLOT]) == 1 for part in contents)
    assert sorted(c for part in contents for c in part[SLOT]) == sorted(state)
    # two checkpoints kept, each with its parts; nothing half-written left behind
    assert sorted(p.name for p in main.parent.iterdir()) == [
        "round_00000.clients", "round_00000.pt", "round_00001.clients", "round_00001.pt"]

    monkeypatch.setattr(experiment, "STATE_PART_BYTES", 64 * 2**20)
    for pools in (1, 2):  # a resume may use another number of pools
        resumed = FederatedRun(validate_config(_scaffold(tiny_config, pools)), tmp_path / "run")
        assert resumed.round == 2
        _assert_same(state, _state(resumed))
        resumed.close()


def test_pools_that_cannot_see_the_run_folder_send_their_parts_to_be_written(
        tmp_path, tiny_config, monkeypatch):
    """A pool on another node without shared storage: the driver writes what it sends."""
    monkeypatch.setattr(experiment, "STATE_PART_BYTES", 1)
    cfg = validate_config(_scaffold(tiny_config))
    direct = _run_rounds(cfg, tmp_path / "direct", 2)
    monkeypatch.setattr(ClientPool, "sees", lambda self, path: self.clients()[0] != 0)
    sent = _run_rounds(cfg, tmp_path / "sent", 2)  # the first pool sends, the others write
    _assert_same(direct, sent)
    for name in ("round_00000", "round_00001"):
        a = sorted((tmp_path / "direct" / "checkpoints" / f"{name}.clients").iterdir())
        b = sorted((tmp_path / "sent" / "checkpoints" / f"{name}.clients").iterdir())
        assert [p.name for p in a] == [p.name for p in b]
        for x, y in zip(a, b, strict=True):
            _assert_same(torch.load(x, weights_only=True)[SLOT],
                         torch.load(y, weights_only=True)[SLOT])
    monkeypatch.undo()
    resumed = FederatedRun(cfg, tmp_path / "sent")
    _assert_same(sent, _state(resumed))
    resumed.close()


@pytest.mark.parametrize("damage", ["cut", "missing"])
def test_a_damaged_client_state_part_falls_back_to_the_previous_checkpoint(
        tmp_path, tiny_config, monkeypatch, damage):
    monkeypatch.setattr(experiment, "STATE_PART_BYTES", 1)
    cfg = validate_config(_scaffold(tiny_config))
    earlier = _run_rounds(cfg, tmp_path / "earlier", 2)
    _run_rounds(cfg, tmp_path / "run", 3)
    part = tmp_path / "run" / "checkpoints" / "round_00002.clients" / "00003.pt"
    if damage == "cut":
        part.write_bytes(part.read_bytes()[:100])  # a disk that filled up mid-write
    else:
        part.unlink()
    with pytest.warns(UserWarning, match=r"round_00002.pt \(client state part .*00003.pt is "
                                         r".*resuming from round_00001.pt"):
        resumed = FederatedRun(cfg, tmp_path / "run")
    assert resumed.round == 2
    _assert_same(earlier, _state(resumed))
    resumed.close()


class _Payload:
    """Unpickling this runs ``open(path, "w")``: what a crafted part could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_client_state_part_is_refused_without_running_it(tmp_path, tiny_config):
    cfg = validate_config(_scaffold(tiny_config))
    _run_rounds(cfg, tmp_path / "run", 2)
    main = tmp_path / "run" / "checkpoints" / "round_00001.pt"
    part = client_state_folder(main) / "00000.pt"
    marker = tmp_path / "code-ran"
    torch.save({SLOT: {0: _Payload(str(marker))}}, part, pickle_module=pickle)
    held = torch.load(main, weights_only=True)  # the record made to match, as a forger would
    held["client_state_parts"][0] = part.stat().st_size
    torch.save(held, main)
    with pytest.raises(CheckpointError, match="00000.pt: refused to load"):
        FederatedRun(cfg, tmp_path / "run")
    assert not marker.exists()


def test_a_checkpoint_with_the_client_state_inside_still_resumes(tmp_path, tiny_config):
    """Checkpoints written before the parts held every pool's export in the main file."""
    cfg = validate_config(_scaffold(tiny_config))
    state = _run_rounds(cfg, tmp_path / "run", 2)
    main = tmp_path / "run" / "checkpoints" / "round_00001.pt"
    folder = client_state_folder(main)
    held = torch.load(main, weights_only=True)
    held["client_state"] = [torch.load(p, weights_only=True) for p in sorted(folder.iterdir())]
    del held["client_state_parts"]
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    torch.save(held, main)
    resumed = FederatedRun(cfg, tmp_path / "run")
    assert resumed.round == 2
    _assert_same(state, _state(resumed))
    resumed.close()


def test_a_tune_checkpoint_carries_the_client_state_parts(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr(experiment, "STATE_PART_BYTES", 1)
    cfg = validate_config(_scaffold(tiny_config))
    first = RunWriter(tmp_path / "first")
    state = _run_rounds(cfg, first.dir, 2)
    packed = tmp_path / "tune_checkpoint"
    packed.mkdir()
    pack_checkpoint(first, first.latest_checkpoint(), packed)
    moved = RunWriter(tmp_path / "moved")  # a retried trial on another node: nothing local
    adopt_checkpoint(tune.Checkpoint.from_directory(str(packed)), moved)
    resumed = FederatedRun(cfg, moved.dir)
    assert resumed.round == 2
    _assert_same(state, _state(resumed))
    resumed.close()


def test_ray_pools_stream_their_state_into_the_parts(ray_local, tmp_path, tiny_config,
                                                     monkeypatch):
    from ray_lips.pools.ray_actors import RayPoolFactory

    monkeypatch.setattr(experiment, "STATE_PART_BYTES", 1)
    cfg = validate_config(_scaffold(tiny_config, pools=2))
    run = FederatedRun(cfg, tmp_path / "run", make_pools=RayPoolFactory(cfg.resources))
    try:
        run.run_round()
        state = _state(run)
    finally:
        run.close()
    parts = list((tmp_path / "run" / "checkpoints" / "round_00000.clients").glob("*.pt"))
    assert len(parts) == len(state) == tiny_config["data"]["clients"]
    resumed = FederatedRun(cfg, tmp_path / "run")  # in-process pools read what Ray wrote
    assert resumed.round == 1
    _assert_same(state, _state(resumed))
    resumed.close()


def _forge_part(main, part: dict, index: int = 0) -> None:
    """``part`` as client state part ``index`` of checkpoint ``main``, its size recorded in the
    main file as a forger who can write the run folder would."""
    file = client_state_folder(main) / f"{index:05d}.pt"
    torch.save(part, file)
    held = torch.load(main, weights_only=True)
    held["client_state_parts"][index] = file.stat().st_size
    torch.save(held, main)


@pytest.mark.parametrize("slot, client", [
    ("{escape}/x", 0),      # an absolute path as the slot
    ("../../x", 0),         # out of the spill folder
    ("lips.grad", 0),       # a real slot, but not one that SCAFFOLD with the dense hand-out keeps
    (SLOT, "../../x"),      # the right slot, a client that is not a number
])
def test_a_part_with_a_slot_or_client_the_run_does_not_keep_is_refused_and_writes_nothing(
        tmp_path, tiny_config, slot, client):
    """Names in a part never become file names: a spilling pool (client_state_mb tiny) once
    wrote ``x-0.pt`` wherever a crafted slot pointed."""
    escape = tmp_path / "escape"
    escape.mkdir()
    slot = slot.format(escape=escape)
    tree = _scaffold(tiny_config)
    tree["resources"].update(client_state_mb=1e-6, spill_dir=str(tmp_path / "spill" / "deep"))
    cfg = validate_config(tree)
    state = _run_rounds(cfg, tmp_path / "run", 2)
    main = tmp_path / "run" / "checkpoints" / "round_00001.pt"
    entry = state[0]
    _forge_part(main, {slot: {client: entry, 1: entry}})  # two entries: the first one spills
    with pytest.raises(CheckpointError, match=r"00000.pt: refused to load: client"):
        FederatedRun(cfg, tmp_path / "run")
    assert not list(tmp_path.rglob("x-*.pt"))
    assert not list(escape.iterdir())


def test_a_legacy_part_with_the_old_gradient_slot_name_still_resumes(tmp_path, tiny_config):
    """``grads`` is what LIPS's slot was called before the slots had names: it is accepted."""
    tree = copy.deepcopy(tiny_config)
    tree["train"].update(rounds=4, local_epochs=1, checkpoint_every=1)
    cfg = validate_config(tree)
    run = FederatedRun(cfg, tmp_path / "run")
    run.run_round()
    run.close()
    main = tmp_path / "run" / "checkpoints" / "round_00000.pt"
    clients = set()
    for index, part in enumerate(sorted(client_state_folder(main).glob("*.pt"))):
        held = torch.load(part, weights_only=True)
        assert list(held) == ["lips.grad"]
        clients |= set(held["lips.grad"])
        _forge_part(main, {"grads": held["lips.grad"]}, index)
    resumed = FederatedRun(cfg, tmp_path / "run")
    kept = {c for pool in resumed.pools.pools for c in pool.store.clients("lips.grad")}
    assert kept == clients and clients
    resumed.close()


def test_spilled_entries_are_named_by_numbers_inside_the_spill_folder(tmp_path):
    """Whatever a slot is called, its spilled entries stay in the store's own folder."""
    from ray_lips.pools.client_store import ClientStore

    (tmp_path / "escape").mkdir()
    store = ClientStore(budget_bytes=1, spill_root=str(tmp_path / "spill" / "deep"))
    slots = [str(tmp_path / "escape" / "x"), "../../x", "a/b", SLOT]
    entries = {(slot, client): {"w": torch.full((4,), float(k * 10 + client))}
               for k, slot in enumerate(slots) for client in (0, 7)}
    for (slot, client), entry in entries.items():
        store.put(client, slot, entry)
    assert store.spilled == len(entries) - 1
    folder = next((tmp_path / "spill" / "deep").iterdir())
    files = sorted(p.name for p in tmp_path.rglob("*.pt"))
    assert files == sorted(p.name for p in folder.iterdir()) and len(files) == store.spilled
    assert all(name.removesuffix(".pt").replace("-", "").isdigit() for name in files)
    for (slot, client), entry in entries.items():
        assert torch.equal(store.get(client, slot)["w"], entry["w"])


@pytest.mark.parametrize("algorithm, handout", [
    ("fedavg", "lips"), ("fedprox", "lips"), ("scaffold", "lips"), ("fedper", "dense"),
    ("ditto", "dense"), ("local", "dense")])
def test_every_slot_a_run_keeps_is_one_its_algorithm_and_hand_out_declare(
        tmp_path, tiny_config, algorithm, handout):
    """What a resume accepts from a part (``client_slots``) covers all a run writes into it."""
    from ray_lips.algorithms import client_slots

    tree = copy.deepcopy(tiny_config)
    tree.update(algorithm=algorithm, handout=handout)
    tree["train"].update(rounds=2, local_epochs=1)
    cfg = validate_config(tree)
    run = FederatedRun(cfg, tmp_path / "run")
    run.run_round()
    kept = {slot for pool in run.pools.pools for slot in pool.store.slots()}
    run.close()
    assert kept and kept <= client_slots(cfg)
