"""LoRA on megatron-core models through stock peft, with Hugging Face module names.

    from peft import LoraConfig, PeftModel, get_peft_model
    import mcore_transformers.peft as mpeft

    mpeft.enable(model)                                   # the HF-named view peft targets
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    ...train...
    mpeft.save_adapter(peft_model, "adapter/")            # collective; HF PEFT folder, vLLM-loadable
    mpeft.save_distributed_checkpoint(peft_model, "ckpt/") # collective; base + adapter state, megatron's format
    peft_model = mpeft.load_distributed_adapter(MCoreModelForCausalLM.from_pretrained("ckpt/", tp=2), "ckpt/")
    PeftModel.from_pretrained(model, "hf-adapter/")       # adapters trained with HF load exactly
    merged = peft_model.merge_and_unload()                # then merged.save_pretrained("merged/")

How it fits together: `targets` derives, from the weight rules, which rows/columns of every HF
projection each rank holds and exposes them as HF-named slots; peft wraps a slot in its LoRA layer,
which `layers` adopts; `host` runs the megatron linear with base and LoRA in one pass; `io` writes
adapters, `distributed` keeps their state in distributed checkpoints; `compat` keeps peft's
transformers-5 MoE conversion (per-expert names → fused `target_parameters`) away from these models,
whose view has a module per expert. See docs/lora.md.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .distributed import load_distributed_adapter, save_distributed_checkpoint
from .errors import AdapterError
from .io import save_adapter
from .targets import attach, detach, find_view

__all__ = [
    "AdapterError", "disable", "enable", "hf_target_modules", "load_distributed_adapter", "save_adapter",
    "save_distributed_checkpoint",
]


def enable(model: nn.Module) -> nn.Module:
    """Give `model` the HF-named LoRA view peft targets (`model.layers.N.self_attn.q_proj`, ...). Idempotent.

    The view holds no parameters and changes nothing until peft attaches a LoRA layer.
    """
    attach(model)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Remove the LoRA view (after `unload()` / `merge_and_unload()`): the model is as loaded."""
    detach(model)
    return model


def hf_target_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """`target_modules` in HF names: megatron names map to the projections they compute.

    `linear_qkv` → q_proj, k_proj, v_proj; `linear_proj` → o_proj; `linear_fc1` → gate_proj, up_proj;
    `linear_fc2` → down_proj (each HF projection gets its own A and B, as HF trains them). HF names
    pass through. Use it for configs written with megatron names: peft matches names literally.
    """
    view = find_view(model) or attach(model)
    by_megatron: dict[str, dict[str, None]] = {}  # megatron linear -> its HF projections, in rule order
    for host in view.hosts:
        by_megatron.setdefault(host.name.rsplit(".", 1)[-1], {}).update((p.name, None) for _, _, p in host.parts)
    known = view.projection_names()
    result: list[str] = []
    for name in names:
        mapped = list(by_megatron[name]) if name in by_megatron else [name] if name in known else None
        if mapped is None:
            raise AdapterError(
                f"target module {name!r} is neither an HF projection ({sorted(known)}) nor a megatron linear "
                f"({sorted(by_megatron)}) of this model."
            )
        result += [m for m in mapped if m not in result]
    return result
