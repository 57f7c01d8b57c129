"""FedPer (Arivazhagan et al., 2019): the body is federated, the last layers stay personal.

The last ``fedper.personal_layers`` weight layers (Conv and Linear modules, counted from the
end in the order the model registers them; by default 1, the classifier) never leave the
client, with any layer the model registers after the first of them (the BatchNorm that
follows a personal convolution): the server averages the body only, and each client trains
and holds the shared body with its own head. In the zoo's ResNets a block registers its
shortcut after its second convolution, so ``personal_layers: 2`` there is ``fc`` and the last
block's shortcut convolution with its BatchNorm.

``fedper.local_bn: true`` also keeps every BatchNorm layer of the body local, as FedBN (Li et
al., 2021) does: its weight, bias and running statistics stay in the client's store, over
what the client is handed, and are never averaged (label-skewed clients see different feature
statistics). There is no global model to score (acc_global is NaN); the global state's
personal entries stay at their initial values, unused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ray_lips.algorithms.base import (
    GLOBAL_BODY,
    Algorithm,
    AlgorithmOptions,
    LocalSettings,
)

if TYPE_CHECKING:
    from torch import nn

HEAD = "fedper.head"  # the client-state slot of the personal entries (head, local BatchNorm)
WEIGHT_LAYERS = ("conv", "linear")  # the layer kinds personal_layers counts


def personal_modules(model: nn.Module, layers: int, local_bn: bool) -> list[str]:
    """The names of the modules whose entries stay on the client: the model's tail from its
    ``layers``-th last weight layer on (counting every parameter-owning module when it has no
    Conv or Linear layer), and with ``local_bn`` every BatchNorm module."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from ray_lips.models import layer_groups

    groups = layer_groups(model)
    weights = ([i for i, g in enumerate(groups) if g.kind in WEIGHT_LAYERS]
               or list(range(len(groups))))
    names = [g.name for g in groups[weights[-min(layers, len(weights))]:]] if weights else []
    if local_bn:
        names += [name for name, module in model.named_modules()
                  if isinstance(module, _BatchNorm) and name not in names]
    return names


class FedPer(Algorithm):
    name = "fedper"
    label = "FedPer"
    order = 30
    family = GLOBAL_BODY  # averaged body, its own head
    has_global_model = False
    sparse_handout = False
    client_slots = (HEAD,)
    local_slot = HEAD  # its personal entries are its local ones: kept here, never sent

    class Options(AlgorithmOptions):
        personal_layers: int = Field(1, ge=1)  # trailing weight layers (Conv/Linear) kept local
        local_bn: bool = False  # every BatchNorm layer (weights and statistics) kept local too

    options: Options

    def __init__(self, options: Options, settings: LocalSettings, model: nn.Module):
        super().__init__(options, settings, model)
        modules = personal_modules(model, options.personal_layers, options.local_bn)
        prefixes = tuple(f"{name}." for name in modules)
        self.personal = [k for k in model.state_dict() if k.startswith(prefixes)]
        self.local = frozenset(self.personal)
