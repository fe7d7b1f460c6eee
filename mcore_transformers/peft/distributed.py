"""A LoRA adapter's state inside a megatron-core distributed checkpoint, beside the base weights.

    mcore_state/dist_ckpt/                  {"model": the chunks' shards, "adapter": the LoRA tensors}
    mcore_state/adapter/adapter_config.json the adapter's peft config (how to rebuild the PEFT model)

Each LoRA tensor is stored whole under its HF PEFT key, the key of `adapter_model.safetensors`
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), as one replicated shard: every rank
that holds it (the tensor-parallel ranks of its linear, the data-parallel replicas) offers it, and the rank
that writes the linear's HF adapter (`LoraHost.writes_adapters`) is its main replica. The keys name HF
modules by global layer (and expert) number, so the state reads back at any tp / pp / vpp / ep: each rank
asks for the keys of the projections it holds.

MCoreTrainer keeps a PEFT model's adapter as an HF PEFT folder instead (its checkpoints step the torch
optimizer, training/checkpoint.py); these keys are that folder's.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Union

import torch
from torch import nn

from ..conversion import distributed
from .errors import AdapterError
from .io import ADAPTER_CONFIG, HF_PREFIX, first_replica
from .slots import ProjectionSlot
from .view import LoraView, find_view

ADAPTER_KEY = "adapter"  # the top-level key of the LoRA state in the sharded state dict
ADAPTER_DIR = "adapter"  # inside mcore_state/: the adapter's config
KINDS = ("lora_A", "lora_B")


def adapter_config_folder(folder: str) -> str:
    return os.path.join(folder, distributed.STATE_DIR, ADAPTER_DIR)


def has_adapter_state(folder: str) -> bool:
    """Whether the distributed checkpoint `folder` holds a LoRA adapter's state."""
    return os.path.isfile(os.path.join(adapter_config_folder(folder), ADAPTER_CONFIG))


def held_lora_layers(view: LoraView, adapter: str) -> Iterator[tuple[str, nn.Module, bool]]:
    """(HF path, LoRA layer, whether this rank is its main replica) for every projection this rank holds
    that `adapter` adapts."""
    for host in view.hosts:
        writes = host.writes_adapters()
        for node, name, projection in host.parts:
            layer = node._modules[name]
            if not isinstance(layer, ProjectionSlot) and adapter in layer.lora_A:
                yield projection.path, layer, writes
    if view.exposed:
        first = first_replica()
        for path, layer in view.exposed_lora_layers():
            if adapter in layer.lora_A:
                yield path, layer, first


def _sharded_lora(view: LoraView, adapter: str, fresh: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """{HF key: ShardedTensor} of this rank's LoRA tensors of `adapter` and {HF key: its parameter}; with
    `fresh`, the shards are new buffers to load into (else the parameters themselves, to save)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    sharded, params = {}, {}
    for path, layer, main in held_lora_layers(view, adapter):
        for kind in KINDS:
            key = f"{HF_PREFIX}{path}.{kind}.weight"
            param = getattr(layer, kind)[adapter].weight
            data = torch.empty_like(param, device="cpu") if fresh else param.detach()
            sharded[key] = ShardedTensor.from_rank_offsets(key, data, replica_id=0 if main else 1)
            params[key] = param
    return sharded, params


def _view_of(model: nn.Module) -> LoraView:
    view = find_view(model)
    if view is None:
        raise AdapterError("This model has no LoRA view: load it with MCoreModelForCausalLM.from_pretrained.")
    return view


def save_distributed_checkpoint(peft_model, save_directory: Union[str, os.PathLike], adapter: str = "default") -> None:
    """Collective: the base weights and LoRA adapter `adapter` of `peft_model` as one distributed checkpoint
    (module docstring), which `mcore-transformers convert` turns back into an HF folder + HF PEFT folder and
    `load_distributed_adapter` reads at any layout. Refused for an adapter merged into the weights (they
    would hold it twice)."""
    model = peft_model.get_base_model()
    configs = peft_model.peft_config
    if adapter not in configs:
        raise AdapterError(f"No adapter named {adapter!r}; this model has {list(configs)}.")
    view = _view_of(model)
    view.check_configs()
    if any(layer.merged for _, layer, _ in held_lora_layers(view, adapter)):
        raise AdapterError(
            f"Adapter {adapter!r} is merged into the weights: save the merged model (merge_and_unload, then "
            "save_distributed_checkpoint) or unmerge it first (unmerge_adapter)."
        )
    sharded, _ = _sharded_lora(view, adapter, fresh=False)
    config = configs[adapter]

    def write_config(folder: str) -> None:
        config.save_pretrained(adapter_config_folder(folder))

    model.save_distributed_checkpoint(save_directory, {ADAPTER_KEY: sharded}, write_config)


def load_distributed_adapter(model: nn.Module, folder: Union[str, os.PathLike], adapter: str = "default"):
    """Collective: a PeftModel around `model` (loaded from `folder` at any layout) with the LoRA adapter whose
    state the distributed checkpoint `folder` holds, bit for bit."""
    from peft import PeftConfig, get_peft_model

    folder = str(folder)
    if not has_adapter_state(folder):
        missing = os.path.join(adapter_config_folder(folder), ADAPTER_CONFIG)
        raise AdapterError(f"{folder} holds no adapter state ({missing} is missing).")
    config = PeftConfig.from_pretrained(adapter_config_folder(folder))
    # The base the adapter was made for stays named: get_peft_model names the checkpoint (with a warning).
    base, config.base_model_name_or_path = config.base_model_name_or_path, None
    peft_model = get_peft_model(model, config, adapter_name=adapter)
    config.base_model_name_or_path = base
    sharded, params = _sharded_lora(_view_of(model), adapter, fresh=True)
    loaded = distributed.load_sharded(
        folder, {ADAPTER_KEY: sharded}, AdapterError, "Load the checkpoint with the base it was written with."
    )[ADAPTER_KEY]
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(loaded[key].to(param.device))
    return peft_model


def check_adapter_fits(peft_model, folder: str, adapter: str = "default") -> None:
    """Collective: refuse (on every rank) an adapter folder whose tensors are not exactly the LoRA tensors
    peft placed on this model (peft itself only warns about keys it did not use)."""
    import torch.distributed as dist
    from peft.utils import load_peft_weights

    if getattr(peft_model.peft_config[adapter], "target_parameters", None):
        return  # stacked-expert keys, read per expert by `fused` (which checks them), not by their file names
    held = {
        f"{HF_PREFIX}{path}.{kind}.weight"
        for path, _, _ in held_lora_layers(_view_of(peft_model.get_base_model()), adapter)
        for kind in KINDS
    }
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, held)
        held = set().union(*every)
    saved = set(load_peft_weights(folder, device="cpu"))
    unused, missing = sorted(saved - held), sorted(held - saved)
    if unused or missing:
        what = f"tensors for modules this model lacks: {unused[:3]}" if unused else f"no tensors for {missing[:3]}"
        raise AdapterError(
            f"The adapter in {folder} does not fit this model: it has {what} ({len(unused) or len(missing)} in all). "
            "It was made for another base model (see base_model_name_or_path in its adapter_config.json)."
        )


def lora_folder_problem(folder: str) -> str | None:
    """Why `folder` is not an HF PEFT LoRA adapter folder, or None when it is one."""
    config_file = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        return f"{folder} is not an HF PEFT adapter folder: it has no {ADAPTER_CONFIG}"
    try:
        with open(config_file) as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError) as err:
        return f"{config_file} is not a peft config: {err}"
    if str(peft_type).upper() != "LORA":
        return f"{folder} holds a {peft_type} adapter; only LoRA adapters convert"
    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in weights):
        return f"{folder} has no adapter weights (adapter_model.safetensors)"
    return None
