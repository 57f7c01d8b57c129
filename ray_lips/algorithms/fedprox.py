"""FedProx (Li et al., 2020): FedAvg whose local objective adds (mu / 2) ||w - w_start||^2.

``w_start`` is the model the client was handed this round (with LIPS in a sparsity round, the
client's sparse copy: that is the model the client holds). mu = 0 is FedAvg, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray_lips.algorithms.base import Algorithm, ClientContext, Correction, Tensors


class FedProx(Algorithm):
    name = "fedprox"

    def correction(self, ctx: ClientContext, client: int, start: Tensors,
                   message: Mapping[str, Tensors]) -> Correction | None:
        mu = self.cfg.fedprox.mu
        return Correction(coef=mu, anchor=start) if mu else None
