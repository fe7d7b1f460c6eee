"""Write the benchmark checkpoints with transformers' own save_pretrained (random Qwen2-style bf16 weights).

    python benchmarks/make_checkpoint.py            # ~314M parameters -> /tmp/mcore_bench/qwen2-300m
    python benchmarks/make_checkpoint.py --small    # ~7M parameters   -> /tmp/mcore_bench/qwen2-small

The folder is reused when it already holds a complete checkpoint of the same config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

ROOT = os.environ.get("MCORE_BENCH_DIR", "/tmp/mcore_bench")
SHARDS = 4

# Qwen2-style (q/k/v bias, GQA 16 heads / 4 KV heads, untied head): 313.6M parameters, 627 MB in bf16.
LARGE = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=22, num_attention_heads=16,
    num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
# Same shape family, small enough for a sub-minute sanity run: 6.9M parameters.
SMALL = dict(
    vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def checkpoint_path(small: bool) -> str:
    return os.path.join(ROOT, "qwen2-small" if small else "qwen2-300m")


def _complete(folder: str, kwargs: dict) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if any(config.get(k) != v for k, v in kwargs.items()):
        return False
    return all(os.path.exists(os.path.join(folder, shard)) for shard in set(index["weight_map"].values()))


def make_checkpoint(small: bool = False, force: bool = False) -> str:
    """Create (or reuse) the benchmark checkpoint; returns its folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = checkpoint_path(small)
    kwargs = SMALL if small else LARGE
    if not force and _complete(folder, kwargs):
        return folder
    start = time.perf_counter()
    config = AutoConfig.for_model("qwen2", **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # norms are 1 and biases 0 after init: make them non-trivial
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # Just over a quarter of the bytes per shard gives SHARDS files (the largest tensors are ~65 MB).
    shard_bytes = math.ceil(total / SHARDS * 1.02)
    os.makedirs(ROOT, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=shard_bytes)
    n_params = sum(p.numel() for p in model.parameters())
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    print(f"wrote {folder}: {n_params / 1e6:.1f}M params, {total / 1e6:.0f} MB bf16, {len(shards)} shards "
          f"in {time.perf_counter() - start:.1f}s")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small sanity-check model")
    parser.add_argument("--force", action="store_true", help="rewrite even if a complete checkpoint exists")
    args = parser.parse_args()
    print(make_checkpoint(args.small, args.force))


if __name__ == "__main__":
    main()
