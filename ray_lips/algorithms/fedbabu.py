"""FedBABU (Oh, Kim & Yun, ICLR 2022, "FedBABU: Toward Enhanced Representation for Federated
Image Classification"): only the body is trained and averaged; the head keeps its random
initialisation throughout federated training and is trained only in the final fine-tuning.

The head is the classifier (:func:`ray_lips.models.classifier_layer`). Every local step
trains the body alone (the head gets no gradient, no weight decay, no momentum); clients send
the body only, so the global model's head is its initial one, bit for bit, and the global
model (body + initial head) is what every client is handed and holds. The final fine-tuning
(``train.finetune_epochs``) trains the whole model, body and head, as the paper's
fine-tuning does. Deviation: the paper fine-tunes with its own epochs and learning rates;
here the run's fine-tuning settings apply. The LIPS hand-out composes with it (the body's
convolutions are handed out by the server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_lips.algorithms.base import (
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    LocalSettings,
    LocalWork,
    Phase,
    Tensors,
)

if TYPE_CHECKING:
    from torch import nn


class FedBABU(Algorithm):
    name = "fedbabu"
    label = "FedBABU"
    order = 36
    # the global model (with its initial head) until the final fine-tuning, which every
    # algorithm gets: one global model

    @classmethod
    def local_work(cls, options: FedBABU.Options, settings: LocalSettings) -> LocalWork:
        """FedAvg's epochs, the head frozen."""
        return LocalWork(settings.epochs, "body only")

    def __init__(self, options: AlgorithmOptions, settings: LocalSettings, model: nn.Module):
        from ray_lips.models import head_parameter_names

        super().__init__(options, settings, model)
        self.head = frozenset(head_parameter_names(model))
        self.body = tuple(n for n in self.parameter_names if n not in self.head)

    def train(self, round: ClientRound, clients: list[int]) -> list[ClientUpdate]:
        phases = (Phase(self.settings.epochs, self.body),)
        jobs = [round.job(c, self.start_state(round, c), phases=phases) for c in clients]
        done = round.trainer.train(jobs, round.round_idx, evaluate=round.evaluate)
        return [self.update(round, job, trained) for job, trained in zip(jobs, done, strict=True)]

    def shared(self, state: Tensors) -> Tensors:
        return {k: v for k, v in state.items() if k not in self.head}
