"""The config.json of a saved folder: the source's bytes, with only what is no longer true changed.

transformers 5 rewrites configs on save (`rope_theta` → `rope_parameters`, `architectures` → the saving class),
which older transformers releases and vLLM misread, so a save copies the source's config.json verbatim. Three
things can stop being true, and only those keys are rewritten:
- the dtype: the tensors were saved in another dtype than the source's (vLLM's `dtype="auto"` serves what
  config.json states, so a float32 save under `"dtype": "bfloat16"` would be served in bf16);
- `architectures` missing: the HF causal-LM class of the family is added (vLLM otherwise picks another task);
- attributes the user changed on the model's config (`from_pretrained(config=...)`, keywords that update the
  config, `resize_token_embeddings`' vocab_size): those keys take the model's values.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from transformers import AutoConfig, PretrainedConfig

CONFIG_FILE = "config.json"
DTYPE_KEYS = ("dtype", "torch_dtype")
# Bookkeeping transformers adds to to_dict() that says nothing about the model.
IGNORED_KEYS = {"transformers_version", "_name_or_path", "architectures", "auto_map", "_attn_implementation_autoset",
                "_commit_hash", *DTYPE_KEYS}


def config_changes(config: PretrainedConfig, source_folder: Optional[str], saved_dtype: torch.dtype) -> dict[str, Any]:
    """{key: value} to write over the source's config.json for a folder whose tensors are `saved_dtype`."""
    if not source_folder or not os.path.exists(os.path.join(source_folder, CONFIG_FILE)):
        return {}
    with open(os.path.join(source_folder, CONFIG_FILE)) as f:
        raw = json.load(f)
    changes: dict[str, Any] = {}
    saved = str(saved_dtype).removeprefix("torch.")
    keys = [key for key in DTYPE_KEYS if key in raw] or ["torch_dtype"]
    if any(raw.get(key) != saved for key in keys):
        changes.update({key: saved for key in keys})
    if not raw.get("architectures"):
        changes["architectures"] = [causal_lm_class_name(config)]
    source = AutoConfig.from_pretrained(source_folder).to_dict()
    current = config.to_dict()
    for key, value in current.items():
        if key not in IGNORED_KEYS and source.get(key, _MISSING) != value:
            changes[key] = value
    return changes


def causal_lm_class_name(config: PretrainedConfig) -> str:
    """transformers' generating class for the config: image-text-to-text for a vision-language model, else causal LM."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "vision_config", None) is not None:
        mapping = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    name = mapping.get(config.model_type)
    return name if isinstance(name, str) else f"{type(config).__name__.removesuffix('Config')}ForCausalLM"


def rewrite_config(folder: str, changes: dict[str, Any]) -> None:
    """Write `changes` over the keys of folder/config.json, every other key kept in place (2-space JSON)."""
    if not changes:
        return
    path = os.path.join(folder, CONFIG_FILE)
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f, indent=2)
        f.write("\n")


_MISSING = object()
