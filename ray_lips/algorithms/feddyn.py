"""FedDyn (Acar et al., 2021, "Federated Learning Based on Dynamic Regularization").

Client k keeps a gradient state g_k (zero before it first trains). Starting from the model it
was handed, theta_start, it minimises L_k(theta) - <g_k, theta> + (alpha / 2)
||theta - theta_start||^2 (a gradient correction alpha (theta - theta_start) - g_k), reaches
theta_k, and sets g_k <- g_k - alpha (theta_k - theta_start). The server keeps h (zero at
first): h <- h - alpha (1/m) sum_{k in P} (theta_k - theta_start), m the number of *all*
clients and P this round's participants (Algorithm 1 of the paper), and the new global model
is theta <- avg_{k in P} theta_k - h / alpha.

As every average here, the paper's uniform weights are sample shares: theta_k is averaged with
weight n_k / (the participants' samples), and 1/m is n_k / (all clients' samples), the same
when clients hold equal shares; the fixed point is the optimum of the sample-weighted
objective FedAvg minimises. Only parameters carry g_k and h; BatchNorm statistics are the
clients' average, as FedAvg's. With LIPS, theta_start is the client's sparse copy in a
sparsity round (the model it starts from).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from ray_lips.algorithms.base import (
    MODEL,
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    Correction,
    Tensors,
    Trained,
    TrainJob,
)

if TYPE_CHECKING:
    import torch

DRIFT = "drift"  # the aggregated part: theta_k - theta_start, weighted by n_k / all samples
CLIENT_GRAD = "feddyn.grad"  # the client-state slot of g_k


class FedDyn(Algorithm):
    name = "feddyn"
    label = "FedDyn"
    order = 22
    client_slots = (CLIENT_GRAD,)

    class Options(AlgorithmOptions):
        alpha: float = Field(0.01, gt=0)  # weight of the dynamic regulariser

    options: Options

    def init_server_state(self, global_state: Tensors) -> dict[str, torch.Tensor]:
        import torch

        return {n: torch.zeros_like(global_state[n]) for n in self.parameter_names}

    def correction(self, round: ClientRound, client: int, start: Tensors) -> Correction | None:
        grad = round.store.get(client, CLIENT_GRAD)
        return Correction(coef=self.options.alpha, anchor=start,
                          offset=None if grad is None else {n: -g for n, g in grad.items()})

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        out = super().update(round, job, trained)
        alpha, grad = self.options.alpha, round.store.get(job.client, CLIENT_GRAD)
        drift, new_grad = {}, {}
        for n in self.parameter_names:
            theta = trained.state[n]
            drift[n] = theta - job.start[n].to(theta.device, theta.dtype)
            new_grad[n] = (-alpha * drift[n] if grad is None
                           else grad[n].to(theta.device) - alpha * drift[n])
        round.store.put(job.client, CLIENT_GRAD, new_grad)
        out.parts[DRIFT] = (drift, round.samples(job.client) / round.population_weight)
        return out

    def aggregate(self, global_state: Tensors, averages: Mapping[str, Tensors],
                  server_state: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        alpha, average = self.options.alpha, averages[MODEL]
        h = {n: server_state[n] - alpha * averages[DRIFT][n] for n in self.parameter_names}
        new_state = {**global_state, **average}
        for n in self.parameter_names:
            new_state[n] = average[n] - h[n] / alpha
        return new_state, h
