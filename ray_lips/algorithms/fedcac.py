"""FedCAC (Wu et al., AAAI 2023, "Bold but Cautious: Unlocking the Potential of Personalized
Federated Learning through Cautiously Aggressive Collaboration"): each client keeps the
parameters its data are most sensitive to ("critical") close to clients whose critical
parameters lie in the same places, and takes every other entry from the global model.

Client, after local training from ``theta_start``: the sensitivity of each parameter entry is
``|(theta_after - theta_start) * theta_after|``; in every parameter tensor its top
``fedcac.tau`` fraction (``floor(tau * numel)``, as the LIPS hand-out's
:func:`~ray_lips.algorithms.handouts.sparsify.keep_count`; ties broken towards the lower flat
index) are its critical parameters, mask M_i. It uploads its model (aggregated as FedAvg's,
weighted by samples) and, individually, its model's parameters and M_i.

Server, over the round's participants: overlap(i, j) = |M_i ∩ M_j| / |M_i| over all parameters
(the reference's ``1 - sum|M_i - M_j| / (2 sum M_i)``, the same number since every |M_i| is
equal); ``avg`` and ``max`` over the off-diagonal overlaps; threshold(r) = avg + (r + 1) / beta
* (max - avg) after round r (0-based); client i collaborates with every j != i whose overlap(i,
j) >= threshold, and its customised model C_i is the plain (unweighted) mean of the trained
models of i and its collaborators (summed in float64, i first, then the others in client
order, rounded once). The server sends client i only the values of C_i at M_i (the client
knows M_i). A round with one participant leaves it its own trained values.

Next round client i starts from, and meanwhile holds (``acc_after``, fine-tuning), the model
with M_i's entries from C_i and every other entry, BatchNorm statistics and buffers included,
from the global model as handed to it (LIPS's sparse copy composes: it sparsifies the global
part). Before its first training a client has no mask and starts from the handed model.

Choices and deviations: collaboration is among the round's participants only (the reference
runs full participation); a client that sits a round out keeps its mask and customised values;
C_i's buffers are not used (the reference averages them, then overwrites parameters only, so
buffers follow the global model there too); exactly floor(tau * numel) critical entries per
tensor (the reference keeps every entry scoring at least the cut, so ties can add more, and
lowers a zero cut to the smallest nonzero score); ``tau: 0`` (no critical parameters, or any tau
whose floor(tau * numel) is 0 in every tensor) is FedAvg bit for bit: nothing is sent
individually and nothing customised. ``beta`` defaults to 170, the default of a public
re-implementation's FedCAC (``tau`` 0.5, ``beta`` 170); the reference code requires an
integer beta >= 1, as here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from ray_lips.algorithms.base import (
    GLOBAL_BODY,
    MODEL,
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    ClientView,
    LocalSettings,
    LocalWork,
    Tensors,
    Trained,
    TrainJob,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

MASK = "fedcac.mask"  # the client-state slot of a client's critical mask (bool per parameter)
CUSTOM = "fedcac.custom"  # the slot of its customised model's values at its mask, flat
CRITICAL = "critical"  # the individual part holding the mask (MODEL holds the parameters)
OVERLAP_CHUNK = 2**20  # mask entries per client a chunk of the overlap count takes


def critical_mask(start: torch.Tensor, after: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` entries of largest ``|(after - start) * after|``, as a boolean mask of the
    tensor's shape; among equal scores the lower flat index wins. The keep-th largest score is
    one number whatever finds it, so the mask is too."""
    import torch

    score = ((after - start) * after).abs().reshape(-1)
    if keep >= score.numel():
        return torch.ones_like(after, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(after, dtype=torch.bool)
    cut = torch.kthvalue(score, score.numel() - keep + 1).values  # the keep-th largest
    mask = score > cut
    short = keep - int(mask.sum())
    mask[(score == cut).nonzero().squeeze(1)[:short]] = True
    return mask.view_as(after)


def overlap_counts(masks: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """|M_i ∩ M_j| for every pair of clients, exact (integers summed in float64), in chunks."""
    import torch

    count = len(masks)
    total = torch.zeros(count, count, dtype=torch.float64)
    for name in masks[0]:
        flat = [m[name].reshape(-1) for m in masks]
        for begin in range(0, flat[0].numel(), OVERLAP_CHUNK):
            block = torch.stack([f[begin:begin + OVERLAP_CHUNK] for f in flat]).to(torch.float64)
            total += block @ block.T
    return total


def collaborators(overlap: list[list[float]], round_idx: int, beta: int) -> list[list[int]]:
    """For each client (by position), the positions of those it collaborates with, itself
    first: every other one whose overlap with it reaches the round's threshold."""
    count = len(overlap)
    if count < 2:
        return [[i] for i in range(count)]
    off = [overlap[i][j] for i in range(count) for j in range(count) if i != j]
    avg, top = sum(off) / len(off), max(off)
    threshold = avg + (round_idx + 1) / beta * (top - avg)
    return [[i, *(j for j in range(count) if j != i and overlap[i][j] >= threshold)]
            for i in range(count)]


class FedCAC(Algorithm):
    name = "fedcac"
    label = "FedCAC"
    order = 38
    family = GLOBAL_BODY  # the global model but for its critical entries, customised
    client_slots = (MASK, CUSTOM)
    personalised_slot = CUSTOM

    class Options(AlgorithmOptions):
        tau: float = Field(0.5, ge=0.0, le=1.0)  # critical fraction of every parameter tensor
        beta: int = Field(170, ge=1)  # rounds the collaboration threshold takes to reach max

    options: Options

    def __init__(self, options: Options, settings: LocalSettings, model: nn.Module):
        from ray_lips.algorithms.handouts.sparsify import keep_count  # torch: not at import

        super().__init__(options, settings, model)
        kept = {name: keep_count(p.numel(), options.tau) for name, p in model.named_parameters()}
        self.keep = {name: keep for name, keep in kept.items() if keep > 0}  # has critical ones
        self.active = bool(self.keep)  # else FedAvg, bit for bit

    @classmethod
    def local_work(cls, options: FedCAC.Options, settings: LocalSettings) -> LocalWork:
        """FedAvg's epochs."""
        return LocalWork(settings.epochs)

    # ----- client side --------------------------------------------------------------------
    def start_state(self, round: ClientRound, client: int) -> Tensors:
        return self.held_state(round, client)

    def held_state(self, view: ClientView, client: int) -> Tensors:
        """The handed model with the client's critical entries from its customised model."""
        handed = view.handed(client)
        if not self.active:
            return handed
        mask = view.store.get(client, MASK)
        values = view.store.get(client, CUSTOM)
        if mask is None or values is None:
            return handed
        held = dict(handed)
        for name, critical in mask.items():
            base = handed[name]
            held[name] = base.masked_scatter(critical.to(base.device),
                                             values[name].to(base.device, base.dtype))
        return held

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        out = super().update(round, job, trained)
        if not self.active:
            return out
        masks = {}
        for name, keep in self.keep.items():
            after = trained.state[name]
            masks[name] = critical_mask(job.start[name].to(after.device), after, keep)
        round.store.put(job.client, MASK, masks)
        out.individual = {MODEL: {name: trained.state[name] for name in self.keep},
                          CRITICAL: masks}
        return out

    # ----- server side --------------------------------------------------------------------
    def personalise(self, individual: Mapping[int, Mapping[str, Tensors]], global_state: Tensors,
                    round_idx: int, server_state: Tensors) -> dict[int, dict[str, torch.Tensor]]:
        """Each participant's customised model at its critical entries (flat, in mask order)."""
        import torch

        clients = list(individual)
        masks = [individual[c][CRITICAL] for c in clients]
        models = [individual[c][MODEL] for c in clients]
        counts = overlap_counts(masks).tolist()
        sizes = [counts[i][i] for i in range(len(clients))]
        if not all(sizes):
            return {}
        overlap = [[counts[i][j] / sizes[i] for j in range(len(clients))]
                   for i in range(len(clients))]
        groups = collaborators(overlap, round_idx, self.options.beta)
        out: dict[int, dict[str, torch.Tensor]] = {clients[i]: {} for i in range(len(clients))}
        for name in masks[0]:
            rows = torch.stack([m[name].reshape(-1) for m in models])  # client x entry
            for i, group in enumerate(groups):
                where = masks[i][name].reshape(-1).nonzero().squeeze(1)
                picked = rows.index_select(1, where).to(torch.float64)  # client x critical
                total = picked[group[0]].clone()
                for j in group[1:]:
                    total += picked[j]
                out[clients[i]][name] = (total / len(group)).to(rows.dtype)
        return out
