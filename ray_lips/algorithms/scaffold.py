"""SCAFFOLD (Karimireddy et al., 2020), option II control variates.

Client i corrects every local gradient by c - c_i. After K local steps of learning rate lr from
x (the model it was handed) to y_i, it sets c_i+ = c_i - c + (x - y_i) / (K' lr), keeps c_i+,
and returns y_i (weighted by its share of the round's samples, as FedAvg) and
Δc_i = c_i+ - c_i (weighted by its share n_i / n of all clients' samples). The server moves x by
the server step size towards the clients' average, x <- x + server_lr (avg y - x), and
c <- c + Σ (n_i / n) Δc_i, so c stays the sample-weighted mean of every client's c_i (the
paper's (1/N) Σ when clients hold equal shares) and the fixed point is the optimum of the
sample-weighted objective FedAvg minimises. With c = c_i = 0 the first round is FedAvg's;
server_lr = 1 makes the new global model the clients' average. K' is K for plain SGD and the
momentum-weighted step count (:func:`momentum_steps`) for SGD with momentum, so that c_i+ stays
the average gradient along the client's path, as option II intends.
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

CONTROL = "control"  # the message and the aggregated part: the global control variate c
CLIENT_CONTROL = "scaffold.c"  # the client-state slot of c_i


def momentum_steps(steps: int, momentum: float) -> float:
    """How many plain SGD steps K steps of SGD with ``momentum`` (a fresh buffer, PyTorch's
    form buf = momentum * buf + g) move the weights under a constant gradient:
    sum_t (1 - momentum^t) / (1 - momentum); K without momentum. Dividing the displacement by
    it (not by K) keeps c_i+ the average gradient: with momentum 0.9 and 5 steps the plain K
    would overstate it 2.6x, and SCAFFOLD then diverged on MNIST-1D (resnet8_1d, lr 0.1)."""
    if momentum == 0:
        return float(steps)
    return sum((1 - momentum**t) / (1 - momentum) for t in range(1, steps + 1))


def _zeros_like(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.zeros_like(tensor)


class Scaffold(Algorithm):
    name = "scaffold"
    label = "SCAFFOLD"
    order = 20
    client_slots = (CLIENT_CONTROL,)

    class Options(AlgorithmOptions):
        server_lr: float = Field(1.0, gt=0)  # server step size (1: the clients' average)

    options: Options

    def init_server_state(self, global_state: Tensors) -> dict[str, torch.Tensor]:
        return {name: _zeros_like(global_state[name]) for name in self.parameter_names}

    def server_message(self, server_state: Tensors) -> dict[str, Tensors]:
        return {CONTROL: server_state}

    def _client_control(self, round: ClientRound, client: int,
                        like: Tensors) -> dict[str, torch.Tensor]:
        kept = round.store.get(client, CLIENT_CONTROL)
        return dict(kept) if kept is not None else {n: _zeros_like(like[n])
                                                    for n in self.parameter_names}

    def correction(self, round: ClientRound, client: int, start: Tensors) -> Correction | None:
        c = round.message[CONTROL]
        c_i = self._client_control(round, client, c)
        return Correction(offset={n: c[n].to(c_i[n].device) - c_i[n]
                                  for n in self.parameter_names})

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        out = super().update(round, job, trained)
        c = round.message[CONTROL]
        c_i = self._client_control(round, job.client, c)
        scale = 1.0 / (momentum_steps(trained.result.steps, self.settings.momentum)
                       * self.settings.lr)
        new_c_i, delta = {}, {}
        for n in self.parameter_names:
            drift = (job.start[n].to(trained.state[n].device) - trained.state[n]) * scale
            new_c_i[n] = c_i[n] - c[n].to(c_i[n].device) + drift
            delta[n] = new_c_i[n] - c_i[n]
        round.store.put(job.client, CLIENT_CONTROL, new_c_i)
        out.parts[CONTROL] = (delta, round.samples(job.client) / round.population_weight)
        return out

    def aggregate(self, global_state: Tensors, averages: Mapping[str, Tensors],
                  server_state: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        average, step = averages[MODEL], self.options.server_lr
        new_state = dict(global_state)
        for name, value in average.items():
            x = global_state[name]
            new_state[name] = (value if step == 1.0 or not x.is_floating_point()
                               else x + step * (value - x))
        control = {n: server_state[n] + averages[CONTROL][n] for n in self.parameter_names}
        return new_state, control
