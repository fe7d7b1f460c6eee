"""Adapter export: HF PEFT folders (adapter_config.json + adapter_model.safetensors) that transformers
(`PeftModel.from_pretrained(AutoModelForCausalLM...)`) and vLLM load.

Every tensor-parallel rank holds the whole adapter of its linears, so one rank per linear (its
group's first, in the first data-parallel replica) sends that adapter's tensors to global rank 0;
pipeline stages (and, for routed experts, expert-parallel ranks) each send their own layers. Rank 0
writes the folder beside the target and renames it into place. Loading needs nothing of ours: peft's
`PeftModel.from_pretrained(model, folder)` reads the HF keys straight into the HF-named view.
"""

from __future__ import annotations

import copy
import os
import shutil
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..conversion.writer import commit_folder, temporary_sibling
from .errors import AdapterError
from .fused import SOURCE, fuse_state
from .slots import ProjectionSlot
from .view import LoraView, find_view

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_PREFIX = "base_model.model."  # what peft puts before a model's own module paths


def _local_adapter(view: LoraView, adapter: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """What this rank contributes: tensors of `adapter` under HF keys for the projections it writes
    (its linear's first tensor-parallel rank in the first data-parallel replica), the paths it adapts,
    and every projection path it holds."""
    tensors, adapted, paths = {}, [], []
    for host in view.hosts:
        writes = host.writes_adapters()
        for node, name, projection in host.parts:
            paths.append(projection.path)
            module = node._modules[name]
            if not writes or isinstance(module, ProjectionSlot) or adapter not in module.lora_A:
                continue
            adapted.append(projection.path)
            tensors.update(_lora_tensors(projection.path, module, adapter))
    if view.exposed:  # replicated modules (a vision tower): the first tensor- and data-parallel rank writes
        paths += view.exposed_linear_paths()
        if first_replica():
            for path, layer in view.exposed_lora_layers():
                if adapter in layer.lora_A:
                    adapted.append(path)
                    tensors.update(_lora_tensors(path, layer, adapter))
    return tensors, adapted, paths


def _lora_tensors(path: str, layer, adapter: str) -> dict[str, torch.Tensor]:
    return {
        f"{HF_PREFIX}{path}.{kind}.weight": getattr(layer, kind)[adapter].weight.detach().cpu().contiguous()
        for kind in ("lora_A", "lora_B")
    }


def first_replica() -> bool:
    if not dist.is_initialized():
        return True
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0


def _gather_to_rank0(payload):
    """Every rank's payload on global rank 0 (None elsewhere). Stages and expert ranks hold different parts."""
    if dist.get_world_size() == 1:
        return [payload]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


def export_config(config, adapted: Sequence[str], all_paths: Sequence[str], base_model: Optional[str]):
    """The config HF and vLLM load: HF module names, task CAUSAL_LM, inference mode."""
    config = copy.deepcopy(config)
    names = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    every = {path for path in all_paths if path.rsplit(".", 1)[-1] in names}
    if every == set(adapted):
        config.target_modules = names  # q_proj, v_proj, ...: every such projection is adapted
    else:
        config.target_modules = sorted(adapted)  # exact module paths (peft matches them literally)
    config.layers_to_transform = None
    config.layers_pattern = None
    config.exclude_modules = None
    config.task_type = config.task_type or "CAUSAL_LM"
    config.base_model_name_or_path = config.base_model_name_or_path or base_model
    config.inference_mode = True
    return config


def export_fused_config(config, adapted: Sequence[str], all_paths: Sequence[str], base_model: Optional[str]):
    """The config of an adapter read from `target_parameters` (fused experts), as it was: its target_parameters,
    rank / alpha patterns and target_modules (the modules it adapts beside the experts)."""
    source = config.__dict__[SOURCE]
    exported = export_config(config, adapted, all_paths, base_model)
    if not adapted:
        exported.target_modules = source["target_modules"]
    exported.target_parameters = list(source["target_parameters"])
    exported.rank_pattern, exported.alpha_pattern = dict(source["rank_pattern"]), dict(source["alpha_pattern"])
    return exported


def _write(target: str, tensors: dict[str, torch.Tensor], config) -> None:
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise AdapterError(f"Cannot save the adapter to {target}: it exists and is a file.")
        entries = [e for e in os.listdir(target) if not e.startswith(".")]
        if entries and ADAPTER_CONFIG not in entries:
            raise AdapterError(
                f"Cannot save the adapter to {target}: it holds files that are not an adapter ({sorted(entries)[:5]}). "
                "Choose a new or empty folder; an existing adapter folder is replaced whole."
            )
    elif not os.path.isdir(os.path.dirname(os.path.abspath(target))):
        raise AdapterError(f"Cannot save the adapter to {target}: its parent folder does not exist.")
    tmp = temporary_sibling(target)
    try:
        save_file(dict(sorted(tensors.items())), os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        commit_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(
    peft_model, save_directory: Union[str, os.PathLike], selected_adapters: Optional[Sequence[str]] = None
) -> None:
    """Collective: write each adapter as an HF PEFT folder, whole across tensor and pipeline parallelism.

    Like `PeftModel.save_pretrained`: the "default" adapter goes to `save_directory`, another one to
    `save_directory/<name>`. Global rank 0 writes; each folder appears atomically; every rank raises
    if writing failed.
    """
    model = peft_model.get_base_model()
    view = find_view(model)
    if view is None:
        raise AdapterError("This model has no LoRA view: call mcore_transformers.peft.enable(model) before get_peft_model.")
    configs = peft_model.peft_config
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise AdapterError(f"No adapter named {unknown}; this model has {list(configs)}.")
    view.check_configs()
    for adapter in names:
        parts = _gather_to_rank0(_local_adapter(view, adapter))
        error = [None]
        if dist.get_rank() == 0:
            try:
                tensors, adapted, paths = {}, [], []
                for rank_tensors, rank_adapted, rank_paths in parts:
                    tensors.update(rank_tensors)
                    adapted += rank_adapted
                    paths += rank_paths
                adapted, paths = sorted(set(adapted)), sorted(set(paths))
                if not adapted:
                    raise AdapterError(f"Adapter {adapter!r} adapts no projection of this model: nothing to save.")
                base = model.__dict__.get("name_or_path") or getattr(model.config, "_name_or_path", None)
                fused = fuse_state(model, configs[adapter], tensors)
                if fused is None:
                    config = export_config(configs[adapter], adapted, paths, base)
                else:  # read from target_parameters: written back in that format
                    tensors, folded = fused
                    config = export_fused_config(configs[adapter], sorted(set(adapted) - set(folded)), paths, base)
                target = str(save_directory) if adapter == "default" else os.path.join(str(save_directory), adapter)
                if adapter != "default":
                    os.makedirs(str(save_directory), exist_ok=True)
                _write(target, tensors, config)
            except Exception as err:  # re-raised on every rank below
                error = [err]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise error[0]
