"""FedPart (Wang et al., 2024, "Why Go Full? Elevating Federated Learning Through Partial
Network Updates", arXiv 2410.11559): most rounds train and aggregate one layer group only,
cycling through the network from the input to the classifier, with full-network rounds
between the cycles.

Schedule (the reference's "FedPart (Repeat)", as in the Fling code the LIPS authors build on):
``fedpart.warmup_rounds`` full-network rounds (5), then one cycle over the layer groups in
order, each trained for ``fedpart.rounds_per_group`` consecutive rounds (2), then full rounds
again, and so on to the end. Full rounds are FedAvg's. In a group's round every client trains
only that group's parameters (the rest get no gradient, weight decay or momentum) and sends
only that group's entries (BatchNorm statistics included); the global model keeps the rest.

Layer groups (a choice the paper leaves to the architecture; the reference lists them per
model): each convolution with the BatchNorm that follows it, and the classifier; a parameter
owner of another kind is a group of its own. ``fedpart.groups`` replaces them by lists of
module-name prefixes (``[[""]]``, one group of the whole network, is FedAvg). Deviation: the
reference leaves a frozen layer's BatchNorm statistics, which training-mode passes move, on
each client; here they are not aggregated and every client starts the next round from the
global model's. LIPS's sparse hand-out cannot be composed with it: weights zeroed in a layer
the round does not train could never grow back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ray_lips.algorithms.base import (
    MODEL,
    Algorithm,
    AlgorithmOptions,
    ClientRound,
    ClientUpdate,
    LocalSettings,
    LocalWork,
    Phase,
    Trained,
    TrainJob,
)

if TYPE_CHECKING:
    from torch import nn


def _owns(prefix: str, entry: str) -> bool:
    return prefix == "" or entry == prefix or entry.startswith(prefix + ".")


class FedPart(Algorithm):
    name = "fedpart"
    label = "FedPart"
    order = 28
    sparse_handout = False
    sparse_handout_conflict = ("weights zeroed in a layer group the round does not train could "
                               "never grow back")

    class Options(AlgorithmOptions):
        warmup_rounds: int = Field(5, ge=0)  # full-network rounds before each cycle
        rounds_per_group: int = Field(2, ge=1)  # consecutive rounds of each layer group
        groups: list[list[str]] | None = None  # module-name prefixes per group; None: auto

    options: Options

    @classmethod
    def local_work(cls, options: FedPart.Options, settings: LocalSettings) -> LocalWork:
        """FedAvg's epochs; after the warm-up rounds one layer group trains."""
        return LocalWork(settings.epochs, "one layer group after warm-up")

    def __init__(self, options: Options, settings: LocalSettings, model: nn.Module):
        super().__init__(options, settings, model)
        prefixes = options.groups if options.groups is not None else _default_groups(model)
        entries = list(model.state_dict())
        self.groups: list[tuple[tuple[str, ...], frozenset[str]]] = []
        for group in prefixes:
            params = tuple(n for n in self.parameter_names if any(_owns(p, n) for p in group))
            if not params:
                from ray_lips.config import ConfigError

                raise ConfigError(f"fedpart.groups: {group} names no parameter of the model")
            self.groups.append((params, frozenset(e for e in entries
                                                  if any(_owns(p, e) for p in group))))

    def group_of(self, round_idx: int) -> int | None:
        """The layer group ``round_idx`` trains, or None for a full-network round."""
        period = self.options.warmup_rounds + len(self.groups) * self.options.rounds_per_group
        position = round_idx % period
        if position < self.options.warmup_rounds:
            return None
        return (position - self.options.warmup_rounds) // self.options.rounds_per_group

    def train(self, round: ClientRound, clients: list[int]) -> list[ClientUpdate]:
        group = self.group_of(round.round_idx)
        if group is None:
            return super().train(round, clients)
        phases = (Phase(self.settings.epochs, self.groups[group][0]),)
        jobs = [round.job(c, self.start_state(round, c), phases=phases) for c in clients]
        done = round.trainer.train(jobs, round.round_idx, evaluate=round.evaluate)
        return [self.update(round, job, trained) for job, trained in zip(jobs, done, strict=True)]

    def update(self, round: ClientRound, job: TrainJob, trained: Trained) -> ClientUpdate:
        update = super().update(round, job, trained)
        group = self.group_of(round.round_idx)
        if group is not None:
            state, weight = update.parts[MODEL]
            entries = self.groups[group][1]
            update.parts[MODEL] = ({k: v for k, v in state.items() if k in entries}, weight)
        return update


def _default_groups(model: nn.Module) -> list[list[str]]:
    """Each convolution with the BatchNorm right after it, and every other parameter owner
    (the classifier) alone, in module order."""
    from ray_lips.models import layer_groups

    groups: list[list[str]] = []
    previous = ""
    for layer in layer_groups(model):
        if layer.kind == "bn" and previous == "conv":
            groups[-1].append(layer.name)
        else:
            groups.append([layer.name])
        previous = layer.kind
    return groups
