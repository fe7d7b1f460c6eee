"""What the keyword arguments of transformers' `from_pretrained` mean for a megatron-core model.

Scripts written for `AutoModelForCausalLM.from_pretrained` pass them as they are (run_clm.py passes `from_tf`,
`config`, `cache_dir`, `revision`, `token`, `trust_remote_code`, `dtype`). Each is honoured, accepted because
it has nothing to change here (said in `NOTHING_TO_DO`), or refused with what to do instead, before anything
is loaded. Keywords that are attributes of the model's config update the config, as in transformers; any
other keyword is an error naming it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from ..errors import MCoreTransformersError

# Accepted, nothing to change: megatron-core always loads lazily and computes attention with its own core.
NOTHING_TO_DO = {
    "low_cpu_mem_usage": "weights are always read lazily, shard by shard",
    "attn_implementation": "attention runs in megatron-core's core (torch sdpa on the local spec, TE on GPUs)",
    "weights_only": "only safetensors files are read (no pickle)",
    "_from_auto": None,
    "_from_pipeline": None,
    "_commit_hash": None,
    "adapter_kwargs": None,
}

# Refused whenever they ask for something: (what is asked, what to do instead).
REFUSED_WHEN_SET = {
    "quantization_config": "quantized loading is not supported: load the model in bf16/fp16/fp32 (dtype=)",
    "load_in_8bit": "8-bit loading is not supported: load the model in bf16/fp16/fp32 (dtype=)",
    "load_in_4bit": "4-bit loading is not supported: load the model in bf16/fp16/fp32 (dtype=)",
    "from_tf": "TensorFlow checkpoints are not read: convert to safetensors with transformers first",
    "from_flax": "Flax checkpoints are not read: convert to safetensors with transformers first",
    "gguf_file": "GGUF files are not read: use the safetensors checkpoint",
    "tp_plan": "megatron-core shards the model: pass tp= (and pp=, ep=) to from_pretrained",
    "tp_size": "megatron-core shards the model: pass tp= to from_pretrained",
    "distributed_config": "megatron-core shards the model: pass tp=, pp=, ep= to from_pretrained",
    "max_memory": "megatron-core places the layers: spread them with tp= / pp= instead",
    "offload_folder": "offloading is not supported: spread the layers with tp= / pp= instead",
    "offload_state_dict": "offloading is not supported: spread the layers with tp= / pp= instead",
    "offload_buffers": "offloading is not supported: spread the layers with tp= / pp= instead",
    "ignore_mismatched_sizes": "shapes must match the config: fix the config or the checkpoint",
    "state_dict": "weights come from the checkpoint folder: save the state dict with save_pretrained first",
    "key_mapping": "checkpoint names are mapped by the family's rules: load an HF-named checkpoint",
    "adapter_name": "load adapters with peft: PeftModel.from_pretrained(model, adapter_folder)",
    "proxies": "set HTTPS_PROXY / HTTP_PROXY in the environment instead",
    "use_kernels": "hub kernels do not apply to megatron-core modules",
}


@dataclass
class PretrainedOptions:
    """The options `from_pretrained` acts on, after transformers' keywords were interpreted."""

    config: Optional[PretrainedConfig] = None  # given by the caller (used instead of the folder's)
    config_updates: dict[str, Any] = field(default_factory=dict)
    hub: dict[str, Any] = field(default_factory=dict)  # revision, token, cache_dir, local_files_only, force_download
    subfolder: str = ""
    variant: Optional[str] = None
    trust_remote_code: Optional[bool] = None
    output_loading_info: bool = False
    generation_config: Optional[GenerationConfig] = None
    notes: list[str] = field(default_factory=list)  # accepted keywords that change nothing (logged at info)


def interpret(kwargs: dict[str, Any], device_type: str) -> PretrainedOptions:
    """Turn transformers' `from_pretrained` keywords into options, or raise before anything is loaded."""
    kwargs = dict(kwargs)
    options = PretrainedOptions()
    for name in ("revision", "token", "cache_dir", "local_files_only", "force_download"):
        if name in kwargs:
            options.hub[name] = kwargs.pop(name)
    if options.hub.get("revision") == "main":
        options.hub.pop("revision")
    options.subfolder = kwargs.pop("subfolder", "") or ""
    options.variant = kwargs.pop("variant", None)
    options.trust_remote_code = kwargs.pop("trust_remote_code", None)
    options.output_loading_info = bool(kwargs.pop("output_loading_info", False))
    options.generation_config = kwargs.pop("generation_config", None)
    if kwargs.pop("use_safetensors", None) is False:
        raise MCoreTransformersError(
            "use_safetensors=False: mcore_transformers reads safetensors checkpoints only. Drop the argument, or "
            "convert the checkpoint with transformers (from_pretrained(...).save_pretrained(...))."
        )
    _check_device_map(kwargs.pop("device_map", None), device_type)
    for name, why in NOTHING_TO_DO.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if why:
                options.notes.append(f"{name}={value!r}: {why}")
    for name, instead in REFUSED_WHEN_SET.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value not in (None, False, {}, ()):
                raise MCoreTransformersError(f"from_pretrained({name}={_short(value)}) cannot be honoured: {instead}.")
    config = kwargs.pop("config", None)
    if config is not None and not isinstance(config, (PretrainedConfig, str, os.PathLike)):
        raise MCoreTransformersError(
            f"config= must be a transformers PretrainedConfig or a path (got {type(config).__name__})."
        )
    if isinstance(config, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(config, trust_remote_code=options.trust_remote_code)
    options.config = copy.deepcopy(config) if config is not None else None
    options.config_updates = kwargs  # checked against the config once it is known (update_config)
    return options


def update_config(config: PretrainedConfig, updates: dict[str, Any]) -> None:
    """transformers' rule: keywords that name a config attribute update it; anything else is an error."""
    unknown = sorted(name for name in updates if not hasattr(config, name))
    if unknown:
        raise TypeError(
            f"from_pretrained got unexpected keyword arguments {unknown}: they are neither from_pretrained options "
            f"nor attributes of the {type(config).__name__}. Check their spelling, or set them on the config."
        )
    for name, value in updates.items():
        setattr(config, name, value)


def _check_device_map(device_map, device_type: str) -> None:
    """None / "auto" / this rank's device type are fine; a map that places layers is megatron's job."""
    if device_map is None or device_map == "auto":
        return
    single = device_map.get("") if isinstance(device_map, dict) and set(device_map) == {""} else device_map
    strategy = isinstance(single, str) and single in ("balanced", "balanced_low_0", "sequential")
    if not strategy and (isinstance(single, (str, int)) or hasattr(single, "type")):
        wanted = "cuda" if isinstance(single, int) else getattr(single, "type", str(single).split(":")[0])
        if wanted == device_type:
            return
        raise MCoreTransformersError(
            f"device_map={_short(device_map)} asks for {wanted}, but this rank runs on {device_type}: each rank "
            "holds its shard on its own device (LOCAL_RANK's GPU, or the CPU). Drop device_map or pass 'auto'."
        )
    raise MCoreTransformersError(
        f"device_map={_short(device_map)} places layers on devices, which megatron-core decides: spread the model "
        "with from_pretrained(..., tp=N, pp=M) under torchrun instead, and drop device_map (or pass 'auto')."
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
