"""The training engine's seams for algorithms that are not a gradient correction: a loss term on
outputs and representations, trainable subsets in phases, and the batched path's fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ray_lips.algorithms.base import TrainJob
from ray_lips.data.augment import Normalisation
from ray_lips.models import MODEL_NAMES, build_model, classifier_layer, head_parameter_names
from ray_lips.pools.payload import ClientShard
from ray_lips.training.local import LocalSettings, Phase, TermBatch, local_train
from ray_lips.training.trainers import GroupTrainer, SerialTrainer, Stopwatch

SHAPE, CLASSES = (1, 8, 8), 4
SETTINGS = LocalSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.01)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _norm() -> Normalisation:
    return Normalisation((0.0,), (1.0,), augment=False)


def _data(seed: int = 0, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def _model(name: str = "smallcnn") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, SHAPE, CLASSES)


def _train(model: nn.Module, **seams) -> dict[str, torch.Tensor]:
    x, y = _data()
    result = local_train(model, x, y, SETTINGS, _norm(), torch.Generator().manual_seed(1),
                         torch.Generator().manual_seed(2), **seams)
    assert result.steps > 0
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict, names=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (names if names is not None else a))


# ----- the representation -----------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if not n.endswith("_1d")])
def test_the_representation_is_the_classifiers_input_in_every_model_of_the_zoo(name):
    model = _model(name).eval()
    layer_name, layer = classifier_layer(model)
    caught = []
    layer.register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    x, _ = _data(n=4)
    x = torch.nn.functional.interpolate(x, size=(32, 32)) if name != "smallcnn" else x
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(layer(caught[0]), logits)  # nothing after the classifier
    assert head_parameter_names(model) == [f"{layer_name}.weight", f"{layer_name}.bias"]


# ----- plain training is untouched ---------------------------------------------------------
def test_one_phase_of_every_parameter_is_plain_training_bit_for_bit():
    plain = _train(_model())
    everything = _train(_model(), phases=(Phase(SETTINGS.epochs),))
    assert _equal(plain, everything)


def test_a_loss_term_of_zero_changes_nothing_and_sees_the_batch():
    seen = []

    def zero(batch: TermBatch) -> torch.Tensor:
        seen.append((batch.inputs.shape[0], batch.logits.shape, batch.features.shape))
        return batch.features.sum() * 0.0

    plain = _train(_model())
    with_term = _train(_model(), loss_term=zero)
    assert _equal(plain, with_term)
    assert seen[0] == (8, torch.Size([8, CLASSES]), torch.Size([8, 64]))
    assert len(seen) == 6  # 24 samples, batches of 8, 2 epochs


# ----- a loss term with frozen models -------------------------------------------------------
def test_a_loss_term_on_a_frozen_models_representation_is_in_the_step():
    """One full-batch SGD step with the term equals the step computed by hand: CE + the
    term on the live representation against a frozen (eval-mode) model's."""
    torch.manual_seed(1)
    target = build_model("smallcnn", SHAPE, CLASSES).state_dict()  # another initialisation

    def pull(batch: TermBatch) -> torch.Tensor:
        frozen = batch.represent(target)
        assert not frozen.requires_grad
        return (batch.features - frozen).pow(2).mean()

    x, y = _data()
    one_step = LocalSettings(epochs=1, batch_size=x.shape[0], lr=0.1, momentum=0.0,
                             weight_decay=0.0)
    model = _model()
    local_train(model, x, y, one_step, _norm(), torch.Generator().manual_seed(1),
                torch.Generator().manual_seed(2), loss_term=pull)

    def represent(net: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        caught = []
        handle = classifier_layer(net)[1].register_forward_pre_hook(
            lambda m, args: caught.append(args[0]))
        logits = net(inputs)
        handle.remove()
        return logits, caught[0]

    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    by_hand, frozen = _model(), _model()
    frozen.load_state_dict(target)
    frozen.eval()
    with torch.no_grad():
        _, target_features = represent(frozen, x[order])
    logits, features = represent(by_hand, x[order])
    loss = (nn.functional.cross_entropy(logits, y[order])
            + (features - target_features).pow(2).mean())
    loss.backward()
    for name, param in by_hand.named_parameters():
        torch.testing.assert_close(model.state_dict()[name], param.detach() - 0.1 * param.grad)
    assert _equal(frozen.state_dict(), target)  # the frozen model is read, never trained


# ----- trainable subsets and phases -------------------------------------------------------
def test_frozen_parameters_get_no_gradient_decay_or_momentum_and_statistics_still_move():
    model = _model()
    head = head_parameter_names(model)
    body = tuple(n for n, _ in model.named_parameters() if n not in head)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    after = _train(model, phases=(Phase(2, body),))
    assert _equal(start, after, head)  # weight decay 0.01 and momentum 0.9 would move it
    assert not _equal(start, after, body)
    assert not torch.equal(start["features.1.running_mean"], after["features.1.running_mean"])
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_phases_run_one_after_another_with_the_batch_order_running_on():
    head = tuple(head_parameter_names(_model()))
    body = tuple(n for n, _ in _model().named_parameters() if n not in head)
    both = _train(_model(), phases=(Phase(1, head), Phase(2, body)))
    x, y = _data()
    model = _model()
    batch_gen, augment_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for phase in (Phase(1, head), Phase(2, body)):
        local_train(model, x, y, SETTINGS, _norm(), batch_gen, augment_gen, phases=(phase,))
    assert _equal(both, model.state_dict())


def test_remembered_gradients_of_a_parameter_the_last_phase_freezes_are_zeros():
    model = _model()
    head = head_parameter_names(model)
    body = tuple(n for n, _ in model.named_parameters() if n not in head)
    x, y = _data()
    result = local_train(model, x, y, SETTINGS, _norm(), torch.Generator().manual_seed(1),
                         torch.Generator().manual_seed(2), remember=[head[0], body[-3]],
                         phases=(Phase(1, body),))
    assert not result.last_grads[head[0]].any()
    assert result.last_grads[body[-3]].any()


# ----- the batched path ---------------------------------------------------------------------
def _shards() -> dict[int, ClientShard]:
    shards = {}
    for client in range(3):
        x, y = _data(seed=10 + client)
        shards[client] = ClientShard(client, x, y, x[:8], y[:8])
    return shards


def _zero_term(batch: TermBatch) -> torch.Tensor:
    return batch.features.sum() * 0.0


def test_a_batched_group_trains_jobs_with_a_loss_term_one_at_a_time_and_says_so_once():
    model, shards = _model(), _shards()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    serial = SerialTrainer(model, shards, SETTINGS, _norm(), 0, Stopwatch())
    group = GroupTrainer(model, shards, SETTINGS, _norm(), 0, 3, Stopwatch(), fallback=serial)
    jobs = [TrainJob(0, start), TrainJob(1, start, loss_term=_zero_term),
            TrainJob(2, start, loss_term=_zero_term)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed = group.train(jobs, round_idx=0)
        group.train(jobs[1:], round_idx=1)
    assert len(caught) == 1 and "one at a time" in str(caught[0].message)
    assert [t.client for t in mixed] == [0, 1, 2]
    alone = SerialTrainer(_model(), shards, SETTINGS, _norm(), 0, Stopwatch())
    for trained, expected in zip(mixed[1:], alone.train(jobs[1:], round_idx=0), strict=True):
        assert _equal(trained.state, expected.state)
    plain = GroupTrainer(_model(), shards, SETTINGS, _norm(), 0, 3, Stopwatch())
    assert _equal(mixed[0].state, plain.train(jobs[:1], round_idx=0)[0].state)


def test_a_batched_group_trains_phases_like_one_at_a_time_in_float64():
    model, shards = _model().double(), _shards()
    shards = {c: ClientShard(c, *(t.double() if t.is_floating_point() else t for t in
                                  (s.x_train, s.y_train, s.x_test, s.y_test)))
              for c, s in shards.items()}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    head = tuple(head_parameter_names(model))
    body = tuple(n for n, _ in model.named_parameters() if n not in head)
    phases = (Phase(1, head), Phase(1, body))
    jobs = [TrainJob(c, start, phases=phases, remember=(head[0], body[-3])) for c in range(3)]
    serial = SerialTrainer(model, shards, SETTINGS, _norm(), 0, Stopwatch()).train(jobs, 0)
    group = GroupTrainer(_model().double(), shards, SETTINGS, _norm(), 0, 3, Stopwatch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # phases need no fallback
        batched = group.train(jobs, 0)
    for expected, got in zip(serial, batched, strict=True):
        assert got.result.steps == expected.result.steps == 6
        for name, value in expected.state.items():
            if value.is_floating_point():
                torch.testing.assert_close(got.state[name], value, rtol=1e-10, atol=1e-12)
        assert not got.result.last_grads[head[0]].any()  # frozen in the last phase
        assert got.result.last_grads[body[-3]].any()
    head_only = GroupTrainer(_model().double(), shards, SETTINGS, _norm(), 0, 3, Stopwatch())
    for got in head_only.train([TrainJob(c, start, phases=phases[:1]) for c in range(3)], 0):
        assert _equal(start, got.state, body)  # the body did not move
        assert not _equal(start, got.state, head)
