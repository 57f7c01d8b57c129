"""Ditto (Li et al., 2021): FedAvg for the global model, plus a personal model per client.

Each round a participant first trains the global model it was handed, as FedAvg (that model
is aggregated), then trains its personal model v for ``ditto.personal_epochs`` epochs
(default: ``train.local_epochs``) on F_k(v) + (lam / 2) ||v - w||^2, w being the global model
it was handed this round. A client's first personal model is that global model. The model a
client holds (acc_after, fine-tuning) is its personal one.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray_lips.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientUpdate,
    Correction,
    Tensors,
    TrainJob,
)

PERSONAL = "ditto.personal"  # the client-state slot of the personal model


class Ditto(Algorithm):
    name = "ditto"
    sparse_handout = False
    client_slots = (PERSONAL,)

    def held_state(self, ctx: ClientContext, client: int) -> Tensors:
        personal = ctx.store.get(client, PERSONAL)
        return ctx.handed(client) if personal is None else personal

    def train(self, ctx: ClientContext, clients: list[int], round_idx: int,
              message: Mapping[str, Tensors], evaluate: bool) -> list[ClientUpdate]:
        updates = super().train(ctx, clients, round_idx, message, evaluate)
        ditto = self.cfg.ditto
        jobs = [TrainJob(c, self.held_state(ctx, c),
                         Correction(coef=ditto.lam, anchor=ctx.handed(c))) for c in clients]
        personal = ctx.trainer.train(jobs, round_idx, stream="personal",
                                     epochs=ditto.personal_epochs or self.cfg.train.local_epochs)
        for done in personal:
            ctx.store.put(done.client, PERSONAL, done.state)
        return updates
