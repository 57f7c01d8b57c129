"""FedRep (Collins, Hassani, Mokhtari & Shakkottai, ICML 2021, "Exploiting Shared
Representations for Personalized Federated Learning"): a shared body, a personal head; each
round the head trains first with the body fixed, then the body with the head fixed.

The head is the classifier (:func:`ray_lips.models.classifier_layer`) and never leaves the
client: a client starts each round from the averaged body it is handed with its own head laid
over it, trains the head alone for ``fedrep.head_epochs`` epochs, then the body alone for
``fedrep.body_epochs`` epochs (default ``train.local_epochs``), each phase with a fresh
optimiser, the batch order running on from one phase to the next; the server averages the
bodies. Frozen parameters get no gradient, weight decay or momentum. A client holds the
averaged body with its own head; there is no global model to score (acc_global is NaN), and
the global state's head stays at its initial value, unused. Defaults: the paper's 10 head
epochs; deviation: the paper trains the body for one epoch, here for ``train.local_epochs``
unless ``body_epochs`` says otherwise, so a round costs ``head_epochs`` epochs more than
FedAvg's. The LIPS hand-out composes with it (the body's convolutions come from the server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ray_lips.algorithms.base import (
    GLOBAL_BODY,
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    LocalSettings,
    LocalWork,
    Phase,
)

if TYPE_CHECKING:
    from torch import nn

HEAD = "fedrep.head"  # the client-state slot of a client's head


class FedRep(Algorithm):
    name = "fedrep"
    label = "FedRep"
    order = 35
    family = GLOBAL_BODY  # averaged body, its own head
    has_global_model = False
    client_slots = (HEAD,)
    local_slot = HEAD

    class Options(AlgorithmOptions):
        head_epochs: int = Field(10, ge=0)  # epochs of the head alone, before the body's
        body_epochs: int | None = Field(None, ge=1)  # default: train.local_epochs

    options: Options

    @classmethod
    def local_work(cls, options: FedRep.Options, settings: LocalSettings) -> LocalWork:
        """The head's epochs, then the body's, each training part of the model."""
        body = options.body_epochs or settings.epochs
        return LocalWork(options.head_epochs + body, f"{options.head_epochs} head + {body} body")

    def __init__(self, options: Options, settings: LocalSettings, model: nn.Module):
        from ray_lips.models import head_parameter_names

        super().__init__(options, settings, model)
        head = head_parameter_names(model)
        self.local = frozenset(head)
        body = tuple(n for n in self.parameter_names if n not in self.local)
        body_epochs = options.body_epochs or settings.epochs
        self.phases = tuple(phase for phase in (Phase(options.head_epochs, tuple(head)),
                                                Phase(body_epochs, body)) if phase.epochs)

    def train(self, round: ClientRound, clients: list[int]) -> list[ClientUpdate]:
        jobs = [round.job(c, self.start_state(round, c), phases=self.phases) for c in clients]
        done = round.trainer.train(jobs, round.round_idx, evaluate=round.evaluate)
        return [self.update(round, job, trained) for job, trained in zip(jobs, done, strict=True)]
