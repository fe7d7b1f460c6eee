"""The HF folders the vLLM tests serve: tiny checkpoints written by transformers, then loaded and saved by
mcore_transformers in several layouts (`save_worker.py` under torchrun for tp=2 / ep=2).

Every folder carries the demo model's tokenizer (vLLM needs one; its vocabulary of 1024 is the models' too), and
head_dim 32 (vLLM's CPU attention has no kernel for the tests' usual 24).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mcore_transformers

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(os.path.dirname(mcore_transformers.__file__), "assets", "demo-model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SIZES = dict(vocab_size=1024, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[])

# name -> (source checkpoint, layout for save_worker, dtype to load in)
SAVED = {
    "llama-tp1": ("llama", "tp1", "float32"),
    "llama-tp2": ("llama", "tp2", "float32"),
    "demo-fp32": ("demo", "tp1", "float32"),  # bf16 files loaded in fp32: the saved config must say float32
    "demo-fp16": ("demo", "tp1", "float16"),  # bf16 files loaded in fp16: vLLM's dtype="auto" must serve fp16
    "qwen3_moe-ep2": ("qwen3_moe", "ep2", "float32"),
    "qwen3_moe-stacked-ep2": ("qwen3_moe-stacked", "ep2", "float32"),
    "no-architectures": ("llama-no-arch", "tp1", "float32"),
    "llama-merged-lora": ("llama", "merge", "float32"),
}


def _with_tokenizer(folder: str) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(DEMO, name), os.path.join(folder, name))


def make_sources(root: str) -> dict[str, str]:
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    sources = {"demo": DEMO}
    for name, model_type, extra, stacked in (
        ("llama", "llama", {}, False),
        ("llama-no-arch", "llama", {}, False),
        ("qwen3_moe", "qwen3_moe", MOE, False),
        ("qwen3_moe-stacked", "qwen3_moe", MOE, True),
    ):
        folder = os.path.join(root, "sources", name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            make_tiny_checkpoint(folder, model_type, seed=3, stacked_experts=stacked, **SIZES, **extra)
            _with_tokenizer(folder)
            if name == "llama-no-arch":
                path = os.path.join(folder, "config.json")
                config = json.load(open(path))
                config.pop("architectures", None)
                json.dump(config, open(path, "w"), indent=2)
        sources[name] = folder
    return sources


def save_all(root: str, env: dict) -> dict[str, str]:
    """Every SAVED folder, written by mcore_transformers (one launch per layout)."""
    sources = make_sources(root)
    saved = {}
    for name, (source, layout, dtype) in SAVED.items():
        target = os.path.join(root, "saved", name)
        saved[name] = target
        if os.path.exists(os.path.join(target, "config.json")):
            continue
        world = 2 if layout in ("tp2", "ep2") else 1
        worker = os.path.join(HERE, "save_worker.py")
        command = [sys.executable, worker] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", worker]
        proc = subprocess.run(command + [sources[source], target, layout, dtype, os.path.join(root, "adapters")],
                              env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"saving {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    saved["adapter"] = os.path.join(root, "adapters", "llama")
    return saved
