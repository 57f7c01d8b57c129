"""FedProx (Li et al., 2020): FedAvg whose local objective adds (mu / 2) ||w - w_anchor||^2.

``fedprox.anchor`` says where the proximal term pulls: ``handed`` (the default) is the model
the client was handed this round, so with LIPS in a sparsity round the client's sparse copy
(the model the client holds and starts from); ``global`` is the server's dense global model of
the round, as the paper defines the term, so with LIPS the term also pulls the zeroed weights
back towards their global values. The two are the same without LIPS and in dense rounds.
mu = 0 is FedAvg, bit for bit.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ray_lips.algorithms.base import Algorithm, AlgorithmOptions, ClientRound, Correction, Tensors


class FedProx(Algorithm):
    name = "fedprox"
    label = "FedProx"
    order = 10

    class Options(AlgorithmOptions):
        mu: float = Field(0.01, ge=0)  # weight of the proximal term (mu / 2) ||w - w_anchor||^2
        anchor: Literal["handed", "global"] = "handed"  # the model it handed, or the dense global

    options: Options

    def correction(self, round: ClientRound, client: int, start: Tensors) -> Correction | None:
        mu = self.options.mu
        if not mu:
            return None
        return Correction(coef=mu,
                          anchor=round.global_state if self.options.anchor == "global" else start)
