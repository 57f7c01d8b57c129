"""Ditto (Li et al., 2021): FedAvg for the global model, plus a personal model per client.

Each round a participant first trains the global model it was handed, as FedAvg (that model
is aggregated), then trains its personal model v for ``ditto.personal_epochs`` epochs
(default: ``train.local_epochs``) on F_k(v) + (lam / 2) ||v - w||^2, w being the global model
it was handed this round, with a random stream of its own. A client's first personal model is
that global model. The model a client holds (acc_after, fine-tuning) is its personal one.
"""

from __future__ import annotations

from pydantic import Field

from ray_lips.algorithms.base import (
    PERSONAL_MODELS,
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    ClientView,
    Correction,
    LocalSettings,
    LocalWork,
    Tensors,
    TrainJob,
)

PERSONAL = "ditto.personal"  # the client-state slot of the personal model


class Ditto(Algorithm):
    name = "ditto"
    label = "Ditto"
    order = 40
    family = PERSONAL_MODELS
    sparse_handout = False
    client_slots = (PERSONAL,)

    class Options(AlgorithmOptions):
        lam: float = Field(0.1, ge=0)  # weight of the personal objective's (lam / 2) ||v - w||^2
        personal_epochs: int | None = Field(None, ge=1)  # default: train.local_epochs

    options: Options

    @classmethod
    def local_work(cls, options: Ditto.Options, settings: LocalSettings) -> LocalWork:
        """The global model's epochs, then the personal model's."""
        personal = options.personal_epochs or settings.epochs
        return LocalWork(settings.epochs + personal,
                         f"{settings.epochs} global + {personal} personal")

    def held_state(self, view: ClientView, client: int) -> Tensors:
        personal = view.store.get(client, PERSONAL)
        return view.handed(client) if personal is None else personal

    def train(self, round: ClientRound, clients: list[int]) -> list[ClientUpdate]:
        updates = super().train(round, clients)
        epochs = self.options.personal_epochs or self.settings.epochs
        jobs = [TrainJob(c, self.held_state(round, c),
                         Correction(coef=self.options.lam, anchor=round.handed(c)),
                         stream="personal", epochs=epochs) for c in clients]
        for done in round.trainer.train(jobs, round.round_idx):
            round.store.put(done.client, PERSONAL, done.state)
        return updates
