"""The HF-named module tree peft walks (`ViewNode`s with `ProjectionSlot` leaves) and its `LoraView` record."""

from __future__ import annotations

import weakref
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .slots import ProjectionSlot

SETTLED = "mcore_settled_adapters"  # on a LoRA layer in an exposed module: its adapters made equal over replicas


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
        # transformers' own modules the model runs (a vision tower), shown whole under their HF path: peft's
        # stock LoRA layers adapt their nn.Linears in place. HF path -> (module, its path under the chunks)
        self.exposed: dict[str, tuple[nn.Module, str]] = {}
        self.exposed_linear_names: set[str] = set()
        self.hook_handles: list = []
        # per-expert slots of experts stacked on disk too (granitemoe): transformers holds them as parameters, which
        # peft adapts only through target_parameters, so module matching (names, "all-linear") must not reach them
        self.parameter_slots: list[str] = []

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
        return {host_part[2].name for host in self.hosts for host_part in host.parts} | self.exposed_linear_names

    def exposed_lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(HF path, peft LoRA layer) for every LoRA layer peft put inside an exposed module."""
        for root, (module, _) in self.exposed.items():
            for name, child in module.named_modules():
                if hasattr(child, "lora_A") and hasattr(child, "get_base_layer"):
                    yield f"{root}.{name}" if name else root, child

    def exposed_linear_paths(self) -> list[str]:
        """HF paths of the exposed modules' linears, adapted or not (not the LoRA layers' own insides)."""
        paths = []
        for root, (module, _) in self.exposed.items():
            inside_lora: tuple[str, ...] = ()
            for name, child in module.named_modules():
                if inside_lora and name.startswith(inside_lora):
                    continue
                if hasattr(child, "lora_A"):
                    inside_lora += (f"{name}.",)
                if hasattr(child, "lora_A") or isinstance(child, nn.Linear):
                    paths.append(f"{root}.{name}")
        return paths

    @torch.no_grad()
    def settle_exposed(self, sequence_parallel: bool) -> None:
        """Collective over the ranks holding the exposed modules (their tensor- and data-parallel groups): LoRA
        layers new to the exposed modules start equal on every replica (the group's first rank's values), and
        under sequence parallelism their gradients, partial per rank like the module's own, are marked to be
        summed over the tensor-parallel group (megatron's `sequence_parallel` attribute, as on the module's
        parameters)."""
        fresh = [
            (layer, adapter)
            for _, layer in self.exposed_lora_layers()
            for adapter in layer.lora_A
            if adapter not in layer.__dict__.get(SETTLED, ())
        ]
        if not fresh:
            return
        self.check_configs()
        weights = [w for layer, adapter in fresh for w in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)]
        for weight in weights:
            weight.sequence_parallel = sequence_parallel
        for group in _replica_groups():
            for dtype in {w.dtype for w in weights}:
                same = [w for w in weights if w.dtype == dtype]
                flat = torch.cat([w.detach().reshape(-1) for w in same])
                dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
                offset = 0
                for weight in same:
                    weight.copy_(flat[offset : offset + weight.numel()].view_as(weight))
                    offset += weight.numel()
        for layer, adapter in fresh:
            layer.__dict__.setdefault(SETTLED, set()).add(adapter)


def _replica_groups() -> list:
    """The tensor- and data-parallel groups of this rank with more than one member (none in a single process)."""
    if not dist.is_initialized():
        return []
    from megatron.core import parallel_state as ps

    groups = [ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True)]
    return [group for group in groups if dist.get_world_size(group) > 1]


def find_view(model: nn.Module) -> Optional[LoraView]:
    for module in model._modules.values():
        if isinstance(module, ViewNode) and "lora_view" in module.__dict__:
            return module.__dict__["lora_view"]
    return None
