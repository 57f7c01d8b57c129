"""FedProx (Li et al., 2020): FedAvg whose local objective adds (mu / 2) ||w - w_start||^2.

``w_start`` is the model the client was handed this round (with LIPS in a sparsity round, the
client's sparse copy: that is the model the client holds). mu = 0 is FedAvg, bit for bit.
"""

from __future__ import annotations

from pydantic import Field

from ray_lips.algorithms.base import Algorithm, AlgorithmOptions, ClientRound, Correction, Tensors


class FedProx(Algorithm):
    name = "fedprox"
    label = "FedProx"
    order = 10

    class Options(AlgorithmOptions):
        mu: float = Field(0.01, ge=0)  # weight of the proximal term (mu / 2) ||w - w_start||^2

    options: Options

    def correction(self, round: ClientRound, client: int, start: Tensors) -> Correction | None:
        mu = self.options.mu
        return Correction(coef=mu, anchor=start) if mu else None
