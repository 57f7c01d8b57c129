"""MOON (Li, He & Song, CVPR 2021, "Model-Contrastive Federated Learning"): FedAvg whose local
loss adds mu times a contrastive loss on the model's representation.

At every local step, with z the representation of the batch by the model in training, z_glob
by the model the client was handed this round (the positive) and z_prev by the client's model
after its previous local training (the negative), both frozen (eval mode, no gradient):
loss = CE + mu * -log(exp(sim(z, z_glob) / tau) / (exp(sim(z, z_glob) / tau)
+ exp(sim(z, z_prev) / tau))), sim the cosine similarity, averaged over the batch. A client's
first negative is the model it was handed (then the term has no gradient). Defaults: mu 1,
tau 0.5 (the paper's temperature; its mu is 1 to 10 by dataset). Deviation: the paper adds a
projection head (two linear layers) before the loss; here the representation is the
classifier's input (:func:`ray_lips.models.classifier_layer`) for every model, the zoo's
ResNets and VGG included (after their global average pool), so the architecture, and with it
every other algorithm's numbers, stays the same. mu = 0 is FedAvg, bit for bit. Its local
steps run one client at a time (two extra forward passes each); the LIPS hand-out composes
with it, the positive then being the client's sparse copy, the model it starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from ray_lips.algorithms.base import (
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    LocalSettings,
    LocalWork,
    Tensors,
    TermBatch,
    Trained,
    TrainJob,
)

PREVIOUS = "moon.previous"  # the client-state slot of a client's previous local model


@dataclass(frozen=True)
class ModelContrast:
    """MOON's term: mu times the contrastive loss of the batch's representation against the
    ``positive`` model's (pulled towards) and the ``negative`` model's (pushed from)."""

    mu: float
    tau: float
    positive: Tensors
    negative: Tensors

    def __call__(self, batch: TermBatch):
        import torch
        from torch.nn import functional as F

        z = batch.features.flatten(1)
        pos = F.cosine_similarity(z, batch.represent(self.positive).flatten(1), dim=-1)
        neg = F.cosine_similarity(z, batch.represent(self.negative).flatten(1), dim=-1)
        logits = torch.stack([pos, neg], dim=1) / self.tau
        labels = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        return self.mu * F.cross_entropy(logits, labels)


class Moon(Algorithm):
    name = "moon"
    label = "MOON"
    order = 15
    client_slots = (PREVIOUS,)

    class Options(AlgorithmOptions):
        mu: float = Field(1.0, ge=0)  # weight of the contrastive loss
        tau: float = Field(0.5, gt=0)  # its temperature

    options: Options

    @classmethod
    def local_work(cls, options: Moon.Options, settings: LocalSettings) -> LocalWork:
        """FedAvg's epochs; each step also runs the two frozen models forward (none at mu 0)."""
        if not options.mu:
            return LocalWork(settings.epochs)
        return LocalWork(settings.epochs, "+2 forward passes of frozen models")

    def train(self, round: ClientRound, clients: list[int]) -> list[ClientUpdate]:
        if not self.options.mu:
            return super().train(round, clients)
        jobs = []
        for client in clients:
            start = self.start_state(round, client)
            previous = round.store.get(client, PREVIOUS)  # on the CPU if it was spilled
            negative = start if previous is None else {
                k: v.to(start[k].device) for k, v in previous.items()}
            term = ModelContrast(self.options.mu, self.options.tau, start, negative)
            jobs.append(round.job(client, start, loss_term=term))
        done = round.trainer.train(jobs, round.round_idx, evaluate=round.evaluate)
        return [self.update(round, job, trained) for job, trained in zip(jobs, done, strict=True)]

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        if self.options.mu:
            round.store.put(job.client, PREVIOUS, trained.state)
        return super().update(round, job, trained)
