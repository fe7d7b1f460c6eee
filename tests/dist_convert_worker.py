"""Worker for tests/test_convert.py: `mcore-transformers convert` between HF folders and megatron-core
distributed checkpoints, run as users run it under torchrun (the command joins the running world).

    torchrun --nproc_per_node=2 tests/dist_convert_worker.py ROOT OUT

ROOT holds the tiny checkpoints (and an HF PEFT LoRA adapter of the llama) the test wrote; each step of STEPS runs the
command with its arguments and records its exit code in OUT/record.json; the test reads the folders it
wrote. Errors of the Python API are recorded by type and message. Between steps the parallel state is
torn down, so every step picks its own layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback

# (step, argv after `convert`): {root} / {out} are filled in
STEPS: list[tuple[str, list[str]]] = [
    # dense: HF -> checkpoint at tp=2 (checked against transformers), then back at pp=2 and at tp=1 (dp=2)
    ("llama-to-mcore-tp2", ["{root}/llama", "{out}/llama-tp2", "--tp", "2", "--verify"]),
    ("llama-to-hf-pp2", ["{out}/llama-tp2", "{out}/llama-hf-pp2", "--pp", "2"]),
    ("llama-to-hf-tp1", ["{out}/llama-tp2", "{out}/llama-hf-tp1"]),
    # a checkpoint resharded into another checkpoint, then to HF (the reshard is megatron's own)
    ("llama-mcore-to-mcore-pp2", ["{out}/llama-tp2", "{out}/llama-pp2", "--to", "mcore", "--pp", "2"]),
    ("llama-pp2-to-hf", ["{out}/llama-pp2", "{out}/llama-hf-from-pp2", "--tp", "2", "--verify"]),
    # tied embeddings, a vocabulary tp=2 pads (251 -> 252 rows), cast to bf16 on the way in
    ("tied-to-mcore-bf16", ["{root}/qwen2-tied-v251", "{out}/tied-bf16", "--tp", "2", "--dtype", "bfloat16"]),
    ("tied-to-hf-pp2", ["{out}/tied-bf16", "{out}/tied-hf", "--pp", "2"]),
    # experts: stacked HF tensors, experts over ep=2, back at tp=2 (experts split over etp); names kept stacked
    ("moe-to-mcore-ep2", ["{root}/qwen3_moe-stacked", "{out}/moe-ep2", "--ep", "2", "--verify"]),
    ("moe-to-hf-tp2", ["{out}/moe-ep2", "{out}/moe-hf", "--tp", "2"]),
    # DeepSeek-V3 with MTP tensors no rule claims: kept verbatim through the checkpoint
    ("mtp-to-mcore-tp2", ["{root}/deepseek_v3-mtp", "{out}/mtp-tp2", "--tp", "2"]),
    ("mtp-to-hf", ["{out}/mtp-tp2", "{out}/mtp-hf"]),
    # one KV head at tp=2: two query groups in the checkpoint; back to HF at tp=2
    ("kv1-to-mcore-tp2", ["{root}/llama-kv1", "{out}/kv1-tp2", "--tp", "2"]),
    ("kv1-to-hf-tp2", ["{out}/kv1-tp2", "{out}/kv1-hf", "--tp", "2"]),
    # an HF PEFT adapter merged on the way (what merge_and_unload gives), HF -> HF at tp=2
    ("merge-lora-tp2", ["{root}/llama", "{out}/merged", "--tp", "2", "--to", "hf",
                        "--adapter", "{root}/adapter", "--merge-lora"]),
    # an HF PEFT adapter kept as adapter state in the checkpoint (tp=2), back as an HF PEFT folder at tp=1 (dp=2),
    # resharded into another checkpoint (pp=2) and out of it (to --adapter-out), merged out of a checkpoint
    ("adapter-to-mcore-tp2", ["{root}/llama", "{out}/lora-tp2", "--tp", "2", "--adapter", "{root}/adapter"]),
    ("adapter-tp2-to-hf", ["{out}/lora-tp2", "{out}/lora-hf"]),
    ("adapter-tp2-to-mcore-pp2", ["{out}/lora-tp2", "{out}/lora-pp2", "--to", "mcore", "--pp", "2"]),
    ("adapter-pp2-to-hf", ["{out}/lora-pp2", "{out}/lora-hf-from-pp2", "--tp", "2",
                           "--adapter-out", "{out}/lora-adapter-from-pp2"]),
    ("adapter-merged-from-mcore", ["{out}/lora-tp2", "{out}/lora-merged", "--pp", "2", "--merge-lora"]),
    # refused before anything is written
    ("into-non-empty", ["{root}/llama", "{out}/occupied", "--tp", "2"]),
    ("adapter-of-another-base", ["{root}/llama-kv1", "{out}/refused-other-base", "--tp", "2",
                                 "--adapter", "{root}/adapter"]),
    ("merge-without-adapter", ["{out}/llama-tp2", "{out}/refused-merge", "--merge-lora"]),
    ("adapter-not-lora", ["{root}/llama", "{out}/refused-not-lora", "--adapter", "{root}/llama"]),
]


def _api_errors(root: str, out: str) -> dict:
    """Errors of MCoreModelForCausalLM.from_pretrained on checkpoints it must refuse, by type and message."""
    import shutil

    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.runtime import destroy_parallel_state

    errors = {}
    interrupted = os.path.join(out, "interrupted")
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.copytree(os.path.join(out, "llama-tp2"), interrupted)
        os.remove(os.path.join(interrupted, "mcore_state", "dist_ckpt", "metadata.json"))
    import torch.distributed as dist

    dist.barrier()
    for case, folder, layout in (("other-query-groups", "kv1-tp2", {}), ("interrupted", "interrupted", {"tp": 2})):
        try:
            MCoreModelForCausalLM.from_pretrained(os.path.join(out, folder), **layout)
            errors[case] = None
        except Exception as err:
            errors[case] = {"type": type(err).__name__, "message": str(err)}
        destroy_parallel_state()
    return errors


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    from mcore_transformers.runtime import destroy_parallel_state
    from mcore_transformers.tools.cli import main as cli

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        os.makedirs(os.path.join(out, "occupied"), exist_ok=True)
        with open(os.path.join(out, "occupied", "notes.txt"), "w") as f:
            f.write("mine\n")
    record = {"steps": {}, "output": {}}
    for step, argv in STEPS:
        argv = ["convert"] + [a.format(root=root, out=out) for a in argv]
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                code = cli(argv)
        except BaseException:
            code, printed = -1, io.StringIO(traceback.format_exc())
        record["steps"][step] = code
        record["output"][step] = printed.getvalue()[-3000:]
        print(f"[rank {rank}] {step}: exit {code}\n{printed.getvalue()[-1500:]}", flush=True)
        destroy_parallel_state()
    record["errors"] = _api_errors(root, out)
    if rank == 0:
        with open(os.path.join(out, "record.json"), "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
