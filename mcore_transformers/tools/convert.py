"""`mcore-transformers convert SRC DST`: HF folder ⇄ megatron-core distributed checkpoint, at any layout.

The direction follows SRC: an HF folder (or Hub id) becomes a distributed checkpoint, a distributed
checkpoint (written by convert, `save_distributed_checkpoint` or MCoreTrainer with megatron's optimizer)
becomes an HF folder; `--to` overrides it (HF → HF re-shards or casts; checkpoint → checkpoint reshards).
The weights go through the paths training and serving use: `from_pretrained` reads each rank's slices,
`save_pretrained` / `save_distributed_checkpoint` write them. `--adapter DIR --merge-lora` merges an HF
PEFT adapter into the weights first (what peft's `merge_and_unload` gives).

Afterwards the result is checked (unless --no-check): an HF result from an HF source tensor by tensor
against the source files; any other result is read back at the same layout and every shard compared with
the converted model's. `--verify` then runs the HF-vs-mcore precision check on the result.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .compare import compare_folders
from .launch import is_rank0, say


def _is_distributed(path: str) -> bool:
    from ..conversion import distributed

    return os.path.isdir(path) and distributed.is_distributed_checkpoint(path) and not distributed.has_hf_weights(path)


def _text(layout) -> str:
    text = f"tp={layout.tp} pp={layout.pp}"
    text += f" vpp={layout.vpp}" if layout.vpp else ""
    text += f" ep={layout.ep}" if layout.ep > 1 else ""
    text += f" etp={layout.etp}" if layout.etp and layout.etp != layout.tp else ""
    return text


def _agree(ok: bool) -> bool:
    """True on every rank when it is true on every rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _shards_equal(model, reloaded) -> tuple[int, list[str]]:
    """Collective: compare this rank's shards of two models of one layout; (count, names that differ)."""
    import torch

    mine, theirs = dict(model.named_parameters()), dict(reloaded.named_parameters())
    differ = sorted(n for n in mine if n not in theirs or not torch.equal(mine[n], theirs[n]))
    differ += sorted(set(theirs) - set(mine))
    if _agree(not differ):
        return len(mine), []
    return len(mine), differ or ["(shards of another rank)"]


def _load(path: str, args: argparse.Namespace, dtype):
    from ..model.causal_lm import MCoreModelForCausalLM

    return MCoreModelForCausalLM.from_pretrained(
        path, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp, dtype=dtype
    )


def _merge_adapter(model, adapter: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def _check(args, model, to: str, source_is_hf: bool) -> int:
    if to == "hf" and source_is_hf and not args.adapter:
        if not is_rank0():
            return 0
        count, cast, problems = compare_folders(model.source_folder, args.dst, dtype=model.dtype)
        if problems:
            print(f"check FAILED: {'; '.join(problems)}", file=sys.stderr, flush=True)
            return 1
        dtype = str(model.dtype).replace("torch.", "")
        say(f"check: all {count} tensors equal the source ({f'bit-exact after the cast to {dtype}' if cast else 'bit-exact'})")
        return 0
    reloaded = _load(args.dst, args, model.dtype)
    count, differ = _shards_equal(model, reloaded)
    del reloaded
    if differ:
        say(f"check FAILED: {len(differ)} shards read back from {args.dst} differ: {differ[:6]}", file=sys.stderr)
        return 1
    say(f"check: read back at {_text(model.layout)}, every shard bit-exact ({count} on rank 0)")
    return 0


def _verify(args, model, to: str, source_is_hf: bool) -> int:
    from .verify import VerificationError, verify

    reference = args.dst if to == "hf" else args.src if source_is_hf else None
    if reference is None:
        say("verify: skipped, neither side is an HF folder transformers can load as the reference.")
        return 0
    if to == "mcore":  # check what was written: the model read back from DST
        model = _load(args.dst, args, model.dtype)
    try:
        report = verify(reference, model=model, dtype=model.dtype, seq_len=args.verify_seq_len)
    except VerificationError as err:
        say(err.report)
        say("verify FAILED: mcore and transformers disagree beyond the tolerances above.", file=sys.stderr)
        return 1
    say(report)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..errors import MCoreTransformersError

    if os.path.realpath(args.src) == os.path.realpath(args.dst):
        say(f"error: SRC and DST are the same folder ({args.src}): choose a new DST.", file=sys.stderr)
        return 1
    source_is_hf = not _is_distributed(args.src)
    to = args.to or ("mcore" if source_is_hf else "hf")
    if args.merge_lora and not args.adapter:
        say("error: --merge-lora needs --adapter DIR (the HF PEFT adapter folder to merge).", file=sys.stderr)
        return 1
    if args.adapter and not args.merge_lora:
        say("error: --adapter converts adapters only merged into the weights here: add --merge-lora. (A separate "
            "adapter converts as it is: peft's folders load on any layout with PeftModel.from_pretrained.)",
            file=sys.stderr)
        return 1
    try:
        start = time.perf_counter()
        model = _load(args.src, args, None if args.dtype == "auto" else args.dtype)
        if args.adapter:
            model = _merge_adapter(model, args.adapter)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        if to == "hf":
            model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
        else:
            model.save_distributed_checkpoint(args.dst)
        saved = time.perf_counter() - start
    except (MCoreTransformersError, ValueError) as err:
        say(f"error: {err}", file=sys.stderr)
        return 1

    what = "an HF folder" if to == "hf" else "a megatron-core distributed checkpoint"
    merged = f" + {args.adapter} merged" if args.adapter else ""
    say(f"converted {args.src}{merged} -> {args.dst} ({what}): {model.num_parameters():,} parameters, "
        f"{str(model.dtype).replace('torch.', '')} (load {loaded:.1f}s, save {saved:.1f}s at {_text(model.layout)})")
    ok = args.no_check or _agree(_check(args, model, to, source_is_hf) == 0)
    if ok and args.verify:
        ok = _agree(_verify(args, model, to, source_is_hf) == 0)
    return 0 if ok else 1


def add_convert_arguments(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("src", help="HF model folder or Hub id, or a distributed checkpoint folder")
    convert.add_argument("dst", help="new folder to write")
    convert.add_argument("--to", choices=("hf", "mcore"), default=None,
                         help="format of DST: an HF folder or a megatron-core distributed checkpoint "
                              "(default: the other format than SRC's)")
    convert.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: tp)")
    convert.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                         help="dtype of the saved weights (default: the checkpoint's)")
    convert.add_argument("--adapter", default=None, help="an HF PEFT adapter folder to merge (with --merge-lora)")
    convert.add_argument("--merge-lora", action="store_true", help="merge --adapter into the weights before saving")
    convert.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default: %(default)s)")
    convert.add_argument("--no-check", action="store_true",
                         help="skip comparing the result with the source (or with the model, read back) afterwards")
    convert.add_argument("--verify", action="store_true",
                         help="afterwards, compare logits and loss with transformers on a random batch")
    convert.add_argument("--verify-seq-len", type=int, default=32, help=argparse.SUPPRESS)
