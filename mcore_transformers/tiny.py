"""Small random HF checkpoints written by transformers itself: the test oracle and the offline demo model."""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small but not degenerate: GQA (4 heads, 2 KV heads), 4 layers so pp=2 and pp=2·vpp=2 both fit.
BASE = dict(
    vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

FAMILIES: dict[str, dict] = {
    "llama": dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }),
    "mistral": dict(sliding_window=7),
    "qwen2": dict(),
    "qwen3": dict(head_dim=24),  # head_dim != hidden / heads
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**BASE, **FAMILIES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_checkpoint(
    folder: str, model_type: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
    max_shard_size: Optional[str] = None, **overrides,
) -> str:
    """Write a random `model_type` checkpoint with transformers' own save_pretrained; returns the folder."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so the test sees them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    os.makedirs(folder, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder
