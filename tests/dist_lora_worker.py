"""LoRA cases for one layout: `python dist_lora_worker.py LAYOUT ROOT OUT` (world of one) or the same
under `torchrun --nproc_per_node=2`. ROOT holds the tiny checkpoints and the HF-made adapters
(`prepare(ROOT)`, run once by the pytest side). For every case of the layout the worker loads a fresh
model, does what the case says with stock peft, and writes per rank:

  OUT/<case>/rank<r>.json   {"ok": bool, "error_type", "error", "info": {...}, "seconds"}
  OUT/<case>/rank<r>.pt     tensors (logits, gradients) for the pytest side to compare with HF peft
  OUT/<case>/...            folders the case saved (adapters, merged models), written by rank 0

It judges nothing: tests/test_lora.py compares with transformers + peft, the oracle.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

LAYOUTS = {
    "tp1": dict(world=1, tp=1, pp=1),
    "tp2": dict(world=2, tp=2, pp=1),
    "pp2": dict(world=2, tp=1, pp=2),
}

# Tiny checkpoints (mcore_transformers.tools.tiny): GQA llama, one KV head (replicated at tp=2),
# qwen2 (q/k/v biases) with one KV head, qwen3 (head_dim != hidden/heads, q/k norms).
CHECKPOINTS = {
    "llama": ("llama", {}),
    "llama-kv1": ("llama", {"num_key_value_heads": 1}),
    "qwen2-kv1": ("qwen2", {"num_key_value_heads": 1}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),  # q/k/v in one HF linear (qkv_proj), gate/up in one (gate_up_proj)
    "glm4": ("glm4", {}),  # o_proj and down_proj feed post-sublayer norms; gate_up_proj
    "olmo2": ("olmo2", {}),  # q and k feed norms over all heads; o_proj and down_proj feed the only norms
    # (1 + w) norms before and after each sublayer, scaled and tied embeddings, gated GELU; gemma2: soft caps;
    # gemma3_text: q/k norms and one rotary table per layer type
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
    "olmo3": ("olmo3", {}),  # olmo2's norms + a window on 3 of every 4 layers
    "granite": ("granite", {}),  # embedding, residual, attention and logits multipliers
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# HF-made adapters, random A and B (init_lora_weights=False), so q, k and v have distinct A.
ADAPTERS = {
    "all": dict(r=4, lora_alpha=8, target_modules=ALL),
    "q": dict(r=4, lora_alpha=32, target_modules=["q_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"down_proj": 2}),
    "phi3": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "glm4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
FAMILY_ADAPTERS = ("phi3", "glm4")  # made for the family of that name only; the others for the Llama-named families
# An adapter made on another base (hidden 96) for the shape-mismatch case.
OTHER_BASE = ("llama", {"hidden_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2})


@dataclass(frozen=True)
class Case:
    kind: str
    checkpoint: str
    layout: str
    adapter: str = "all"
    sequence_parallel: bool = False
    dtype: str = "float32"

    @property
    def id(self) -> str:
        sp = "-sp" if self.sequence_parallel else ""
        dtype = "" if self.dtype == "float32" else f"-{self.dtype}"
        return f"{self.kind}-{self.checkpoint}-{self.adapter}-{self.layout}{sp}{dtype}"

    @property
    def ranks(self) -> int:
        return LAYOUTS[self.layout]["world"]


CASES = [
    # HF adapter -> mcore: logits
    Case("hf-logits", "llama", "tp1"),
    Case("hf-logits", "qwen3", "tp1"),
    Case("hf-logits", "llama", "tp1", "q"),
    Case("hf-logits", "qwen2-kv1", "tp1", "rslora"),
    Case("hf-logits", "llama", "tp2"),
    Case("hf-logits", "llama-kv1", "tp2"),
    Case("hf-logits", "llama-kv1", "tp2", "q"),
    Case("hf-logits", "qwen2-kv1", "tp2", "rslora"),
    Case("hf-logits", "qwen3", "tp2"),
    Case("hf-logits", "llama", "tp2", sequence_parallel=True),
    Case("hf-logits", "llama", "tp2", dtype="bfloat16"),
    Case("hf-logits", "llama", "pp2"),
    Case("hf-logits", "phi3", "tp1", "phi3"),
    Case("hf-logits", "phi3", "tp2", "phi3"),
    Case("export", "phi3", "tp2", "phi3"),
    Case("merge", "phi3", "tp2", "phi3"),
    Case("grads", "phi3", "tp2", "phi3"),
    Case("hf-logits", "glm4", "tp2", "glm4"),
    Case("merge", "glm4", "tp2", "glm4"),
    Case("grads", "glm4", "tp2", "glm4"),
    Case("hf-logits", "olmo2", "tp2"),
    Case("hf-logits", "gemma3_text", "tp1"),
    Case("hf-logits", "gemma3_text", "tp2"),
    Case("hf-logits", "gemma2", "tp2"),
    Case("hf-logits", "olmo3", "tp2"),
    Case("hf-logits", "granite", "tp2"),
    Case("merge", "gemma2", "tp2"),
    Case("grads", "gemma3_text", "tp2", sequence_parallel=True),
    Case("hf-logits", "qwen2-kv1", "pp2", "rslora"),
    # mcore-made adapter -> HF PEFT folder
    Case("export", "llama", "tp1"),
    Case("export", "qwen3", "tp1"),
    Case("export", "llama-kv1", "tp2"),
    Case("export", "qwen2-kv1", "tp2"),
    Case("export", "llama", "pp2"),
    # merge_and_unload + save_pretrained
    Case("merge", "llama", "tp1"),
    Case("merge", "qwen2-kv1", "tp1", "rslora"),
    Case("merge", "llama-kv1", "tp2"),
    Case("merge", "qwen3", "tp2"),
    Case("merge", "llama", "pp2"),
    Case("merge", "llama-kv1", "tp2", dtype="bfloat16"),
    # one backward
    Case("grads", "llama", "tp1"),
    Case("grads", "qwen3", "tp1"),
    Case("grads", "llama", "tp2"),
    Case("grads", "llama-kv1", "tp2"),
    Case("grads", "qwen2-kv1", "tp2", "rslora"),
    Case("grads", "llama", "tp2", sequence_parallel=True),
    # several named adapters, set_adapter, disable_adapter, unload
    Case("multi", "llama", "tp1"),
    Case("multi", "llama-kv1", "tp2"),
    # megatron names and all-linear
    Case("names", "llama", "tp1"),
    Case("names", "llama", "tp2"),
    # bad input
    Case("error-dora", "llama", "tp1"),
    Case("error-dora", "llama", "tp2"),
    Case("error-no-match", "llama", "tp1"),
    Case("error-partial-match", "llama", "tp1"),
    Case("error-other-base", "llama", "tp1"),
    Case("error-other-base", "llama", "tp2"),
    Case("error-bias-all", "llama", "tp1"),
    Case("error-modules-to-save", "llama", "tp1"),
    Case("error-pissa", "llama", "tp1"),
    Case("error-mixed-batch", "llama", "tp1"),
    Case("error-save-target", "llama", "tp2"),
]


def cases_for(layout: str) -> list[Case]:
    return [case for case in CASES if case.layout == layout]


def make_inputs(vocab_size: int) -> dict:
    """Two rows of 11 tokens, the second left-padded; labels ignore the padding."""
    import torch

    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab_size, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- the inputs on disk (run once, by the pytest side) ------------------------------------------
def adapter_path(root: str, checkpoint: str, adapter: str) -> str:
    return os.path.join(root, "adapters", f"{checkpoint}-{adapter}")


def prepare(root: str) -> None:
    """Write the tiny checkpoints and the HF-made adapters into ROOT (idempotent)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mcore_transformers.tools.tiny import make_tiny_checkpoint, tiny_config

    for name, (model_type, overrides) in CHECKPOINTS.items():
        folder = os.path.join(root, name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            make_tiny_checkpoint(folder, model_type, **overrides)
        for number, (adapter, kwargs) in enumerate(ADAPTERS.items()):
            target = adapter_path(root, name, adapter)
            mine = adapter == model_type if adapter in FAMILY_ADAPTERS or model_type in FAMILY_ADAPTERS else True
            if os.path.exists(os.path.join(target, "adapter_config.json")) or not mine:
                continue  # made already, or its target names are not this family's
            base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            torch.manual_seed(100 + number)
            peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs))
            peft_model.save_pretrained(target)
    target = os.path.join(root, "adapters", "other-base")
    if not os.path.exists(os.path.join(target, "adapter_config.json")):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(tiny_config(OTHER_BASE[0], **OTHER_BASE[1]))
        get_peft_model(base, LoraConfig(init_lora_weights=False, **ADAPTERS["all"])).save_pretrained(target)


# ---- reading the results back (the pytest side) ------------------------------------------------
def parametrize_cases(cases: list, kind_prefix: str, where=lambda case: True):
    """pytest's parametrize over the `cases` whose kind starts with `kind_prefix` (and that `where` keeps)."""
    import pytest

    chosen = [case for case in cases if case.kind.startswith(kind_prefix) and where(case)]
    return pytest.mark.parametrize("case", chosen, ids=[case.id for case in chosen])


def case_record(out: str, case, rank: int, log: str) -> dict:
    """The worker's record of `case` on `rank` under OUT, with its "tensors" and "folder". Fails the test when
    there is none or when a case that is no error case raised; skips a sequence-parallel case whose model
    refuses sequence parallelism."""
    import pytest
    import torch

    path = os.path.join(out, case.id, f"rank{rank}.json")
    if not os.path.exists(path):
        pytest.fail(f"{case.id}: no record from rank {rank}. Worker log tail:\n{log[-5000:]}")
    with open(path) as f:
        result = json.load(f)
    if getattr(case, "sequence_parallel", False) and not result["ok"] and "sequence parallel not supported" in result["error"]:
        pytest.skip(f"the model does not load with sequence_parallel=True here: {result['error']}")
    if not case.kind.startswith("error") and not result["ok"]:
        pytest.fail(f"{case.id} raised on rank {rank}:\n{result['traceback']}")
    tensors_path = os.path.join(out, case.id, f"rank{rank}.pt")
    result["tensors"] = torch.load(tensors_path) if os.path.exists(tensors_path) else {}
    result["folder"] = os.path.join(out, case.id)
    return result


def hf_logits(model, vocab_size: int):
    """A transformers (or peft) model's logits on `make_inputs(vocab_size)`, without gradients."""
    import torch

    batch = make_inputs(vocab_size)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def read_safetensors(folder: str) -> dict:
    """Every tensor of the *.safetensors files in `folder`."""
    import glob

    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


# ---- the worker ---------------------------------------------------------------------------------
RANK = int(os.environ.get("RANK", 0))


def lora_grads(peft_model) -> dict:
    """Gradients of the LoRA weights under their HF adapter keys."""
    grads = {}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            key = name.replace(".default.", ".")
            grads[key] = None if param.grad is None else param.grad.detach().clone()
    return grads


def run_case(case: Case, root: str, out: str, info: dict, tensors: dict) -> None:
    """Do what `case` says; record into `info` (JSON) and `tensors` (torch.save), also when it raises."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, PeftModel, get_peft_model

    import mcore_transformers.peft as mpeft
    from mcore_transformers import MCoreModelForCausalLM

    layout = LAYOUTS[case.layout]
    model = MCoreModelForCausalLM.from_pretrained(
        os.path.join(root, case.checkpoint), tp=layout["tp"], pp=layout["pp"], sequence_parallel=case.sequence_parallel,
        dtype=getattr(torch, case.dtype),
    )
    mpeft.enable(model)
    batch = make_inputs(model.config.vocab_size)
    folder = adapter_path(root, case.checkpoint, case.adapter)
    case_out = os.path.join(out, case.id)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().clone()

    if case.kind == "hf-logits":
        peft_model = PeftModel.from_pretrained(model, folder)
        tensors["logits"] = logits(peft_model)
        info["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    elif case.kind == "export":
        torch.manual_seed(11 + RANK)  # different on each rank: the replicas must still agree
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        tensors["logits"] = logits(peft_model)
        mpeft.save_adapter(peft_model, os.path.join(case_out, "adapter"))
        if layout["pp"] == 1:  # stock peft's writer sees the whole adapter on every rank when pp == 1
            peft_model.save_pretrained(os.path.join(case_out, "stock"), is_main_process=RANK == 0)

    elif case.kind == "merge":
        merge_case(PeftModel.from_pretrained(model, folder), logits, case_out, info, tensors)

    elif case.kind == "grads":
        peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
        peft_model.train()
        info["requires_grad"] = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
        info["frozen_count"] = sum(1 for p in peft_model.parameters() if not p.requires_grad)
        info["base_requires_grad"] = [n for n, p in model.chunks.named_parameters() if p.requires_grad]
        dropouts = {m: m.p for m in peft_model.modules() if isinstance(m, torch.nn.Dropout)}
        for module in dropouts:
            module.p = 0.0  # compared with HF peft: no dropout
        result = peft_model(**batch)
        result.loss.backward()
        tensors["loss"] = result.loss.detach()
        tensors["grads"] = lora_grads(peft_model)
        if any(dropouts.values()):  # and with the adapter's dropout, which HF cannot reproduce draw for draw
            for module, p in dropouts.items():
                module.p = p
            peft_model.zero_grad()
            result = peft_model(**batch)
            result.loss.backward()
            tensors["dropout_loss"] = result.loss.detach()
            tensors["dropout_grads"] = lora_grads(peft_model)

    elif case.kind == "multi":
        peft_model = PeftModel.from_pretrained(model, folder, adapter_name="first")
        peft_model.load_adapter(adapter_path(root, case.checkpoint, "q"), adapter_name="second")
        tensors["first"] = logits(peft_model)
        tensors["generated"] = peft_model.generate(
            input_ids=batch["input_ids"][:1, :6], max_new_tokens=5, do_sample=False
        ).detach().clone()
        peft_model.set_adapter("second")
        tensors["second"] = logits(peft_model)
        with peft_model.disable_adapter():
            tensors["disabled"] = logits(peft_model)
        peft_model.set_adapter("first")
        tensors["first_again"] = logits(peft_model)
        base = peft_model.unload()
        tensors["unloaded"] = logits(base)
        mpeft.disable(base)
        tensors["view_removed"] = logits(base)

    elif case.kind == "names":
        info["mapped"] = mpeft.hf_target_modules(model, ["linear_qkv", "linear_fc2", "o_proj"])
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=info["mapped"]))
        info["adapted"] = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
        info["stock_mcore_name"] = _error_of(
            lambda: get_peft_model(MCoreModelForCausalLM.from_pretrained(
                os.path.join(root, case.checkpoint), tp=layout["tp"], pp=layout["pp"]), LoraConfig(target_modules=["linear_qkv"]))
        )

    elif case.kind == "error-dora":
        get_peft_model(model, LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    elif case.kind == "error-no-match":
        info["helper"] = _error_of(lambda: mpeft.hf_target_modules(model, ["qq_proj"]))
        get_peft_model(model, LoraConfig(r=2, target_modules=["qq_proj"]))
    elif case.kind == "error-partial-match":
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
        logits(peft_model)
    elif case.kind == "error-other-base":
        PeftModel.from_pretrained(model, os.path.join(root, "adapters", "other-base"))
    elif case.kind == "error-bias-all":
        logits(get_peft_model(model, LoraConfig(r=2, bias="all", target_modules=["q_proj"])))
    elif case.kind == "error-modules-to-save":
        logits(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])))
    elif case.kind == "error-pissa":
        logits(get_peft_model(model, LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"])))
    elif case.kind == "error-mixed-batch":
        peft_model = PeftModel.from_pretrained(model, folder, adapter_name="first")
        peft_model.load_adapter(adapter_path(root, case.checkpoint, "q"), adapter_name="second")
        with torch.no_grad():
            peft_model(input_ids=batch["input_ids"], adapter_names=["first", "second"])
    elif case.kind == "error-save-target":
        peft_model = PeftModel.from_pretrained(model, folder)
        target = os.path.join(case_out, "notes")
        if RANK == 0:
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, "notes.txt"), "w") as f:
                f.write("not an adapter\n")
        if dist.is_initialized():
            dist.barrier()
        try:
            mpeft.save_adapter(peft_model, target)
        finally:
            info["files_after"] = sorted(os.listdir(target))
    else:
        raise ValueError(f"unknown case kind {case.kind}")


def _error_of(fn) -> dict:
    try:
        fn()
    except Exception as err:  # recorded for the pytest side
        return {"type": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__], "message": str(err)}
    return {}


def write_json(path: str, payload: dict) -> None:
    with open(path + ".part", "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(path + ".part", path)


def merge_case(peft_model, logits, case_out: str, info: dict, tensors: dict) -> None:
    """The "merge" kind: logits with the adapter, then merge_and_unload, its logits and save_pretrained."""
    tensors["adapter_logits"] = logits(peft_model)
    merged = peft_model.merge_and_unload()
    info["merged_type"] = type(merged).__name__
    info["lora_modules_left"] = [n for n, m in merged.named_modules() if "lora" in type(m).__name__.lower()]
    tensors["merged_logits"] = logits(merged)
    merged.save_pretrained(os.path.join(case_out, "merged"))


def record_case(case, run_case, root: str, out: str) -> None:
    """Run `run_case(case, root, out, info, tensors)` and write this rank's OUT/<case>/rank<r>.json (and .pt),
    the error too when it raises; then wait for the other ranks."""
    import torch
    import torch.distributed as dist

    case_out = os.path.join(out, case.id)
    os.makedirs(case_out, exist_ok=True)
    start = time.time()
    info, tensors = {}, {}
    record = {"ok": True, "info": info}
    try:
        run_case(case, root, out, info, tensors)
        torch.save(tensors, os.path.join(case_out, f"rank{RANK}.pt"))
    except Exception as err:
        record.update(
            ok=False, error_type=type(err).__name__, error_mro=[c.__name__ for c in type(err).__mro__],
            error=str(err), traceback=traceback.format_exc(),
        )
    record["seconds"] = round(time.time() - start, 3)
    write_json(os.path.join(case_out, f"rank{RANK}.json"), record)
    if dist.is_initialized():
        dist.barrier()


def finish(out: str) -> None:
    """Mark this rank done (OUT/done.rank<r>) and leave the process group."""
    import torch.distributed as dist

    with open(os.path.join(out, f"done.rank{RANK}"), "w") as f:
        f.write("done\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    layout, root, out = sys.argv[1:4]
    only = set(sys.argv[4].split(",")) if len(sys.argv) > 4 else None
    for case in cases_for(layout):
        if not only or case.id in only:
            record_case(case, run_case, root, out)
    finish(out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
