"""The HF-named module tree peft walks (`ViewNode`s with `ProjectionSlot` leaves) and its `LoraView` record."""

from __future__ import annotations

import weakref
from typing import Optional

from torch import nn

from .slots import ProjectionSlot


class ViewNode(nn.Module):
    """A parameter-free container of the HF-named view. LoRA layers peft places here are adopted."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, nn.Module) and not isinstance(value, (ViewNode, ProjectionSlot)) and name in self._modules:
            from .layers import adopt  # peft is only imported once peft itself put a layer here

            value = adopt(value)
        super().__setattr__(name, value)

    def __getitem__(self, key):  # `view.layers[3]`, as on an HF model
        return self._modules[str(key)]

    def child(self, name: str) -> "ViewNode":
        if name not in self._modules:
            self.add_module(name, ViewNode())
        return self._modules[name]

    def forward(self, *args, **kwargs):
        raise RuntimeError("The HF-named LoRA view has no forward pass: call the model.")


class LoraView:
    """Everything LoRA support attaches to one facade: the named roots and the hosts behind them."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self.roots: dict[str, ViewNode] = {}
        self.hosts: list = []
        self._checked: dict[str, int] = {}  # adapter name -> id of the config that passed the checks
        self.unplaced: dict[str, str] = {}  # megatron linear (template) -> why it has no HF-named slots

    @property
    def model(self) -> nn.Module:
        return self._model()

    def slots(self):
        """(HF path, current module) for every projection on this rank: a slot or its LoRA layer."""
        for host in self.hosts:
            for node, name, projection in host.parts:
                yield projection.path, node._modules[name]

    def check_configs(self) -> None:
        """Refuse configs peft accepted but that cannot run here (checked once per config object)."""
        configs = getattr(self.model, "peft_config", None) or {}
        for adapter, config in configs.items():
            if self._checked.get(adapter) != id(config):
                from .layers import check_lora_config

                check_lora_config(config, adapter, self.projection_names(), self.unplaced)
                self._checked[adapter] = id(config)

    def projection_names(self) -> set[str]:
        return {host_part[2].name for host in self.hosts for host_part in host.parts}


def find_view(model: nn.Module) -> Optional[LoraView]:
    for module in model._modules.values():
        if isinstance(module, ViewNode) and "lora_view" in module.__dict__:
            return module.__dict__["lora_view"]
    return None
