"""The case tables shared by the pytest side (tests/conftest.py) and the worker (tests/dist_worker.py).

A *launch* runs the worker once per world size: plain `python` for the world of one,
`torchrun --nproc_per_node=2` for the 2-rank layouts (tp2, pp2, pp2vpp2 one after another, with
`destroy_parallel_state()` between them; within a layout the parallel state is reused across
models). Process start-up (imports) costs far more than a tiny model, hence one launch per world.
The worker writes what each rank saw per run; the pytest side compares that with transformers, the
oracle. Nothing here imports torch at module level, so collection stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

# name -> sizes passed to from_pretrained, and the world (launch) that runs it.
LAYOUTS: dict[str, dict] = {
    "tp1": dict(world=1, tp=1, pp=1, vpp=None),
    "tp2": dict(world=2, tp=2, pp=1, vpp=None),
    "pp2": dict(world=2, tp=1, pp=2, vpp=None),
    "pp2vpp2": dict(world=2, tp=1, pp=2, vpp=2),
    # 4 ranks only for what needs them: KV heads that tp=4 neither divides nor is a multiple of
    "tp4": dict(world=4, tp=4, pp=1, vpp=None),
}


def layouts_of_world(world: int) -> list[str]:
    return [name for name, layout in LAYOUTS.items() if layout["world"] == world]


@dataclass(frozen=True)
class Checkpoint:
    """A tiny random checkpoint written by transformers (`make_tiny_checkpoint`)."""

    model_type: str
    overrides: dict = field(default_factory=dict)
    max_shard_size: Optional[str] = None  # shard the *source* checkpoint


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "ernie4_5", "glm4", "olmo2", "olmo3", "gemma2",
         "gemma3_text", "granite")
# The families also checked at tp=4: the 4-rank launch (4 processes on CI's 2 cores) is the suite's longest, so only
# what tp=4 splits differently from tp=2: plain llama, qwen2's biases, phi3's packed qkv / gate_up slices (with its
# two KV heads each on two ranks). The others' layers split over tp=4 by the same rules as these.
FOUR_RANK_ARCHS = ("llama", "qwen2", "phi3")
# transformers runs Gemma 2 with eager attention (soft-capped scores), where a query with no visible key (left padding)
# takes the mean of every value, so that position's output depends on how many keys the batch has; its logits reach
# the loss (they predict the first real token). Sequence parallelism pads the sequence to a multiple of tp: those runs
# equal transformers on the batch padded the same way (every real position is unaffected; test_parity.oracle_inputs).
PADDING_SENSITIVE_ARCHS = ("gemma2",)

CHECKPOINTS: dict[str, Checkpoint] = {
    **{arch: Checkpoint(arch) for arch in ARCHS},
    # One KV head at tp=2: mcore needs 2 query groups, so the KV head is replicated (qwen2: with bias).
    "llama-kv1": Checkpoint("llama", {"num_key_value_heads": 1}),
    "qwen2-kv1": Checkpoint("qwen2", {"num_key_value_heads": 1}),
    "llama-tied": Checkpoint("llama", {"tie_word_embeddings": True}),
    "qwen3-hd40": Checkpoint("qwen3", {"head_dim": 40}),
    # 251 rows do not split over tp=2: mcore pads to 252, export must cut the pad row.
    "llama-vocab251": Checkpoint("llama", {"vocab_size": 251}),
    "qwen2-tied-vocab251": Checkpoint("qwen2", {"vocab_size": 251, "tie_word_embeddings": True}),
    "qwen2-sharded": Checkpoint("qwen2", {}, max_shard_size="100KB"),
    # Models whose geometry a layout cannot hold (bad-input cases).
    "llama-heads3": Checkpoint("llama", {"num_attention_heads": 3, "num_key_value_heads": 1, "hidden_size": 48}),
    # tp=2 does not divide 3 KV heads, tp=4 does not divide 6: each KV head is repeated to lcm(kv, tp) groups
    "llama-kv3": Checkpoint("llama", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}),
    "qwen2-kv3": Checkpoint("qwen2", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}),
    "llama-kv6": Checkpoint("llama", {"num_attention_heads": 12, "num_key_value_heads": 6, "hidden_size": 96}),
    "llama-layers3": Checkpoint("llama", {"num_hidden_layers": 3}),
    "llama-layers6": Checkpoint("llama", {"num_hidden_layers": 6}),
}


@dataclass(frozen=True)
class Run:
    """One model loaded under one layout: forward on fixed batches, export, save."""

    case: str  # name in test ids, e.g. "llama-bf16"
    checkpoint: str
    layout: str
    dtype: str = "float32"
    sequence_parallel: bool = False
    save_max_shard_size: Optional[str] = None  # None: the default (one file for these tiny models)

    @property
    def id(self) -> str:
        return f"{self.case}-{self.layout}{'sp' if self.sequence_parallel else ''}"

    @property
    def ranks(self) -> int:
        return LAYOUTS[self.layout]["world"]


def _parity_runs() -> list[Run]:
    runs = []
    for arch in ARCHS:
        for layout in LAYOUTS:
            if arch not in FOUR_RANK_ARCHS and LAYOUTS[layout]["world"] > 2:
                continue
            # Multi-rank saves go through the sharded writer; the world of one writes a single file.
            shard = None if layout == "tp1" else "150KB"
            runs.append(Run(arch, arch, layout, save_max_shard_size=shard))
        # Sequence parallelism at tp=2 with an odd sequence length (the batches have 11 tokens).
        runs.append(Run(arch, arch, "tp2", sequence_parallel=True))
    runs += [
        Run("llama-kv1", "llama-kv1", "tp2"),
        Run("qwen2-kv1", "qwen2-kv1", "tp2"),
        Run("qwen2-kv1", "qwen2-kv1", "pp2vpp2"),
        Run("llama-kv3", "llama-kv3", "tp2"),
        Run("qwen2-kv3", "qwen2-kv3", "tp2", sequence_parallel=True),
        Run("llama-kv6", "llama-kv6", "tp4"),
        *(Run("llama-tied", "llama-tied", layout) for layout in LAYOUTS if LAYOUTS[layout]["world"] <= 2),
        Run("qwen3-hd40", "qwen3-hd40", "tp1"),
        Run("qwen3-hd40", "qwen3-hd40", "tp2"),
        Run("llama-vocab251", "llama-vocab251", "tp1"),
        Run("llama-vocab251", "llama-vocab251", "tp2"),
        Run("llama-vocab251", "llama-vocab251", "pp2"),
        Run("qwen2-tied-vocab251", "qwen2-tied-vocab251", "tp2"),
        Run("qwen2-tied-vocab251", "qwen2-tied-vocab251", "pp2"),
        Run("qwen2-tied-vocab251", "qwen2-tied-vocab251", "tp2", sequence_parallel=True),
        *(Run("qwen2-sharded", "qwen2-sharded", layout, save_max_shard_size="150KB") for layout in LAYOUTS),
        *(Run("llama-bf16", "llama", layout, dtype="bfloat16") for layout in LAYOUTS if LAYOUTS[layout]["world"] <= 2),
        Run("qwen3-bf16", "qwen3", "tp2", dtype="bfloat16", save_max_shard_size="100KB"),
    ]
    return runs


PARITY_RUNS: list[Run] = _parity_runs()


@dataclass(frozen=True)
class ErrorRun:
    """A bad input: `action` ("load" or "save") must raise `expected` (a class in mcore_transformers.errors)
    with every word of `words` in its message (case-insensitive), and write nothing.

    `source` is "ckpt:<name>" (a tiny checkpoint), "damaged:<kind>" (a broken copy made by
    `build_damaged`), "path:<literal>" or "hub:<id>". For saves, `target` is "notes-folder" (exists,
    holds a non-model file), "file" (a plain file) or "no-parent"; the model saved is `source`.
    """

    name: str
    layout: str
    action: str
    source: str
    expected: str
    words: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)
    target: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.name}-{self.layout}"

    @property
    def ranks(self) -> int:
        return LAYOUTS[self.layout]["world"]


ERROR_RUNS: list[ErrorRun] = [
    ErrorRun("missing-shard", "tp1", "load", "damaged:missing-shard", "CheckpointError",
             ("model-00002-of-", "missing", "model.safetensors.index.json")),
    ErrorRun("truncated-shard", "tp1", "load", "damaged:truncated", "CheckpointError",
             ("model.safetensors", "truncated")),
    ErrorRun("truncated-shard-of-index", "tp1", "load", "damaged:truncated-sharded", "CheckpointError",
             ("model-00001-of-", "truncated")),
    ErrorRun("wrong-shape", "tp1", "load", "damaged:wrong-shape", "CheckpointError",
             ("model.layers.1.mlp.down_proj.weight", "[64, 100]", "[64, 128]", "config")),
    ErrorRun("unsupported-model-type", "tp1", "load", "damaged:gpt2", "UnsupportedModelError",
             ("gpt2", "llama", "qwen3")),
    ErrorRun("no-config", "tp1", "load", "damaged:no-config", "CheckpointError", ("config.json",)),
    ErrorRun("nonexistent-path", "tp1", "load", "path:/nonexistent/mcore-tiny-model", "CheckpointError",
             ("/nonexistent/mcore-tiny-model", "does not exist")),
    ErrorRun("offline-hub-id", "tp1", "load", "hub:mcore-test-org/not-a-cached-model", "CheckpointError",
             ("mcore-test-org/not-a-cached-model", "hub", "offline")),
    ErrorRun("tp-exceeds-world", "tp1", "load", "ckpt:llama", "LayoutError",
             ("world size 1", "2"), kwargs={"tp": 2}),
    ErrorRun("pp-exceeds-world", "tp1", "load", "ckpt:llama", "LayoutError",
             ("world size 1", "2"), kwargs={"pp": 2}),
    ErrorRun("tp-pp-exceeds-world", "tp2", "load", "ckpt:llama", "LayoutError",
             ("world size 2", "4"), kwargs={"tp": 2, "pp": 2}),
    ErrorRun("tp-not-dividing-heads", "tp2", "load", "ckpt:llama-heads3", "LayoutError",
             ("tp=2", "num_attention_heads=3")),
    ErrorRun("pp-not-dividing-layers", "pp2", "load", "ckpt:llama-layers3", "LayoutError",
             ("num_hidden_layers=3", "2")),
    ErrorRun("pp-vpp-not-dividing-layers", "pp2vpp2", "load", "ckpt:llama-layers6", "LayoutError",
             ("num_hidden_layers=6", "4")),
    ErrorRun("save-onto-file", "tp1", "save", "ckpt:llama", "SaveTargetError", ("is a file",), target="file"),
    # Another layout in a process whose parallel state is up (tp=2 here) needs a teardown first.
    ErrorRun("layout-change-without-teardown", "tp2", "load", "ckpt:llama", "LayoutError",
             ("destroy_parallel_state", "tp"), kwargs={"tp": 1}),
    # Collective: rank 0 checks the target, every rank must raise the same error (no hang, no write).
    ErrorRun("save-onto-file", "tp2", "save", "ckpt:llama", "SaveTargetError", ("is a file",), target="file"),
    ErrorRun("save-onto-file", "pp2", "save", "ckpt:llama", "SaveTargetError", ("is a file",), target="file"),
]

NOTES_TEXT = "my notes: not a model\n"


def runs_for(layout: str) -> tuple[list[Run], list[ErrorRun]]:
    return [r for r in PARITY_RUNS if r.layout == layout], [e for e in ERROR_RUNS if e.layout == layout]


# ---- inputs -------------------------------------------------------------------------------------
def make_batches(vocab_size: int) -> dict[str, dict]:
    """Fixed inputs: a full row, a left-padded row and a right-padded row; 11 tokens (odd, for sp).

    "padded" lets positions default (0..s-1, what both HF and we do without position_ids),
    "positions" passes explicit position_ids (generate-style for the left-padded row, an offset
    for the first row), "plain" has no attention mask at all.
    """
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab_size, (3, 11), generator=gen)
    ids[0, 0] = vocab_size - 1  # the last vocabulary row (next to mcore's TP padding rows)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    positions[0] += 5
    return {
        "padded": dict(input_ids=ids, attention_mask=mask, labels=labels),
        "positions": dict(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels),
        "plain": dict(input_ids=ids[:, :9].clone(), labels=ids[:, :9].clone()),
    }


# ---- the oracle ---------------------------------------------------------------------------------
def oracle_options(folder: str) -> dict:
    """from_pretrained kwargs for transformers' model of a checkpoint, the oracle: soft-capped attention scores (Gemma 2)
    in eager attention, the only implementation that applies the cap on CPU (transformers 5.19 picks sdpa by default,
    which drops it; later releases pick eager themselves)."""
    from transformers import AutoConfig

    capped = getattr(AutoConfig.from_pretrained(folder), "attn_logit_softcapping", None) is not None
    return {"attn_implementation": "eager"} if capped else {}


# ---- checkpoints --------------------------------------------------------------------------------
def build_checkpoints(root: str) -> None:
    """Every checkpoint in CHECKPOINTS plus the damaged copies, under `root` (written once per session)."""
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    for name, spec in CHECKPOINTS.items():
        make_tiny_checkpoint(
            os.path.join(root, name), spec.model_type, max_shard_size=spec.max_shard_size, **spec.overrides
        )
    build_damaged(root)


def build_damaged(root: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    def copy(src: str, kind: str) -> str:
        dst = os.path.join(root, "damaged", kind)
        shutil.copytree(os.path.join(root, src), dst)
        return dst

    # The index names a shard that is not there.
    folder = copy("qwen2-sharded", "missing-shard")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2, shards
    os.remove(os.path.join(folder, shards[1]))

    # A single-file checkpoint and one shard of a sharded one, cut in half.
    for kind, src, file in [("truncated", "llama", "model.safetensors"), ("truncated-sharded", "qwen2-sharded", shards[0])]:
        folder = copy(src, kind)
        path = os.path.join(folder, file)
        os.truncate(path, os.path.getsize(path) // 2)

    # One tensor rewritten with another shape (the checkpoint no longer matches its config).
    folder = copy("llama", "wrong-shape")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.randn(64, 100)
    save_file(tensors, path, metadata={"format": "pt"})

    # A family we do not support (a real transformers gpt2 folder).
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=250, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(os.path.join(root, "damaged", "gpt2"))

    # A folder with weights but no config.json.
    folder = copy("llama", "no-config")
    os.remove(os.path.join(folder, "config.json"))


def resolve_source(root: str, source: str) -> str:
    kind, _, value = source.partition(":")
    if kind == "ckpt":
        return os.path.join(root, value)
    if kind == "damaged":
        return os.path.join(root, "damaged", value)
    if kind in ("path", "hub"):
        return value
    raise ValueError(source)


def folder_snapshot(path: str) -> Optional[dict]:
    """{relative path: size} of every file under `path` (None when it does not exist)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return {"": os.path.getsize(path)}
    found = {}
    for base, _, files in os.walk(path):
        for name in files:
            full = os.path.join(base, name)
            found[os.path.relpath(full, path)] = os.path.getsize(full)
    return found
