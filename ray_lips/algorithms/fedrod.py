"""FedRoD (Chen & Chao, ICLR 2022, "On Bridging Generic and Personalized Federated Learning
for Image Classification"): a generic model trained with the balanced softmax and averaged,
plus a personal head per client on the (detached) representation, kept local.

At every local step, with z the representation (the classifier's input,
:func:`ray_lips.models.classifier_layer`) and g(z) the generic head's logits: the body and
the generic head step on the balanced softmax, CE(g(z) + log n_c) with n_c the client's
training samples of class c (a class it lacks gets log 0 = -inf, as the reference code); the
personal head p steps on CE(g(z) + p(z)) with z and g(z) detached, from the same forward pass,
with an SGD of its own (the run's lr, momentum and weight decay, fresh each round). The body and
generic head are averaged as FedAvg; the personal head never leaves the client (a client's
first is a copy of the generic head it was first handed). The global model is the generic one
(acc_global, acc_test: the paper's generic accuracy); a client predicts with the sum of both
heads' logits: it holds the handed model with a classifier whose weight and bias are the sums
of the two heads' (the same logits, up to rounding). The training loss reported is the
balanced softmax. Its steps run one client at a time; the LIPS hand-out composes with it
(the body is the server's). Deviation: the paper's hypernetwork variant is not offered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ray_lips.algorithms.base import (
    GLOBAL_BODY,
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    ClientView,
    LocalSettings,
    LocalWork,
    Tensors,
    TermBatch,
    Trained,
    TrainJob,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

PERSONAL = "fedrod.head"  # the client-state slot of a client's personal head


class BalancedWithPersonalHead:
    """FedRoD's step: the balanced softmax is the loss of the model in training; the personal
    head (``head``: the classifier's entries) takes its own step on the detached batch."""

    replaces_cross_entropy: ClassVar[bool] = True

    def __init__(self, counts: tuple[int, ...], head: Tensors, names: tuple[str, ...],
                 settings: LocalSettings):
        self.counts, self.names, self.settings = counts, names, settings
        self.start = head
        self.params: list[torch.Tensor] | None = None
        self.optimiser: torch.optim.Optimizer | None = None

    def __call__(self, batch: TermBatch) -> torch.Tensor:
        import torch
        from torch.nn import functional as F

        if self.params is None:
            self.params = [self.start[n].detach().clone().requires_grad_(True)
                           for n in self.names]
            s = self.settings
            self.optimiser = torch.optim.SGD(self.params, lr=s.lr, momentum=s.momentum,
                                             weight_decay=s.weight_decay)
        weight, *bias = self.params
        personal = F.linear(batch.features.detach().flatten(1), weight, bias[0] if bias else None)
        personal_loss = F.cross_entropy(batch.logits.detach() + personal, batch.targets)
        self.optimiser.zero_grad(set_to_none=True)
        personal_loss.backward()
        self.optimiser.step()
        counts = torch.tensor(self.counts, dtype=batch.logits.dtype, device=batch.logits.device)
        return F.cross_entropy(batch.logits + counts.log(), batch.targets)

    def head(self) -> dict[str, torch.Tensor]:
        """The personal head after training (the start one if no step was taken)."""
        if self.params is None:
            return {n: self.start[n].detach().clone() for n in self.names}
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}


class FedRoD(Algorithm):
    name = "fedrod"
    label = "FedRoD"
    order = 37
    family = GLOBAL_BODY  # predicts with the generic model plus its personal head
    client_slots = (PERSONAL,)

    @classmethod
    def local_work(cls, options: FedRoD.Options, settings: LocalSettings) -> LocalWork:
        """FedAvg's epochs; each step also trains the personal head on the same forward pass."""
        return LocalWork(settings.epochs, "+ personal head")

    def __init__(self, options: AlgorithmOptions, settings: LocalSettings, model: nn.Module):
        from ray_lips.models import head_parameter_names

        super().__init__(options, settings, model)
        self.head_names = tuple(head_parameter_names(model))

    def train(self, round: ClientRound, clients: list[int]) -> list[ClientUpdate]:
        if round.class_counts is None:
            raise ValueError("FedRoD needs the clients' class counts (ClientRound.class_counts)")
        jobs = []
        for client in clients:
            start = self.start_state(round, client)
            kept = round.store.get(client, PERSONAL)  # on the CPU if it was spilled
            head = start if kept is None else {k: v.to(start[k].device) for k, v in kept.items()}
            term = BalancedWithPersonalHead(round.class_counts(client), head, self.head_names,
                                            self.settings)
            jobs.append(round.job(client, start, loss_term=term))
        done = round.trainer.train(jobs, round.round_idx, evaluate=round.evaluate)
        return [self.update(round, job, trained) for job, trained in zip(jobs, done, strict=True)]

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        round.store.put(job.client, PERSONAL, job.loss_term.head())
        return super().update(round, job, trained)

    def held_state(self, view: ClientView, client: int) -> Tensors:
        handed = view.handed(client)
        personal = view.store.get(client, PERSONAL)
        if personal is None:
            return handed
        return {**handed, **{n: handed[n] + personal[n].to(handed[n].device)
                             for n in self.head_names}}
