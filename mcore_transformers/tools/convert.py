"""`mcore-transformers convert SRC DST`: HF folder ⇄ megatron-core distributed checkpoint, at any layout.

The direction follows SRC: an HF folder (or Hub id) becomes a distributed checkpoint, a distributed
checkpoint (written by convert, `save_distributed_checkpoint` or MCoreTrainer with megatron's optimizer)
becomes an HF folder; `--to` overrides it (HF → HF re-shards or casts; checkpoint → checkpoint reshards).
The weights go through the paths training and serving use: `from_pretrained` reads each rank's slices,
`save_pretrained` / `save_distributed_checkpoint` write them.

LoRA adapters travel with the weights: `--adapter DIR` (an HF PEFT LoRA folder) goes into a distributed
checkpoint as adapter state (`mcore_transformers/peft/distributed.py`), and a checkpoint holding adapter
state becomes an HF folder plus the HF PEFT folder `DST/adapter/` (or `--adapter-out DIR`), or another
checkpoint that keeps it. `--merge-lora` merges the adapter (given, or held by the checkpoint) into the
weights instead (what peft's `merge_and_unload` gives).

Afterwards the result is checked (unless --no-check): an HF result from an HF source tensor by tensor
against the source files; any other result is read back at the same layout and every shard compared with
the converted model's. `--verify` then runs the HF-vs-mcore precision check on the result.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Optional

from .compare import compare_folders
from .launch import is_rank0, say

ADAPTER_SUBFOLDER = "adapter"  # in an HF result: the adapter a checkpoint held (unless --adapter-out)


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


def _source_has_adapter(path: str) -> bool:
    from ..peft.distributed import has_adapter_state

    return _is_distributed(path) and has_adapter_state(path)


def _with_adapter(model, path: str, adapter: Optional[str]):
    """The PeftModel of `model` with the adapter of folder `adapter`, or of checkpoint `path`'s adapter
    state; None when there is neither."""
    if adapter is not None:
        from peft import PeftModel

        from ..peft.distributed import check_adapter_fits

        peft_model = PeftModel.from_pretrained(model, adapter)
        check_adapter_fits(peft_model, adapter)
        return peft_model
    if _source_has_adapter(path):
        from ..peft.distributed import load_distributed_adapter

        return load_distributed_adapter(model, path)
    return None


def _adapter_problem(args, source_is_hf: bool) -> Optional[str]:
    """Why the adapter options do not fit the source (None when they do), said before anything is loaded."""
    from ..peft.distributed import lora_folder_problem

    held = not source_is_hf and _source_has_adapter(args.src)
    if args.adapter and held:
        return (f"{args.src} already holds adapter state; convert it without --adapter (or convert its base "
                "first with --merge-lora, then add the new adapter).")
    if args.merge_lora and not (args.adapter or held):
        return (f"--merge-lora needs an adapter: --adapter DIR (an HF PEFT folder), or a distributed checkpoint "
                f"that holds adapter state ({args.src} holds none).")
    unmerged_to_hf = _target_format(args, source_is_hf) == "hf" and not args.merge_lora and (args.adapter or held)
    if args.adapter_out and not unmerged_to_hf:
        return "--adapter-out is where an unmerged adapter goes when converting to an HF folder; it has none here."
    if args.adapter:
        problem = lora_folder_problem(args.adapter)
        if problem:
            return f"--adapter: {problem}."
    return None


def _target_format(args, source_is_hf: bool) -> str:
    return args.to or ("mcore" if source_is_hf else "hf")


def _adapter_folder(args) -> str:
    return args.adapter_out or os.path.join(args.dst, ADAPTER_SUBFOLDER)


def _check(args, model, to: str, source_is_hf: bool, with_adapter: bool) -> int:
    """`model` is what was saved: the PeftModel when an unmerged adapter went along."""
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
    if with_adapter:  # the adapter read back too: its state in the checkpoint, or the HF PEFT folder written
        reloaded = _with_adapter(reloaded, args.dst, _adapter_folder(args) if to == "hf" else None)
    count, differ = _shards_equal(model, reloaded)
    del reloaded
    if differ:
        say(f"check FAILED: {len(differ)} shards read back from {args.dst} differ: {differ[:6]}", file=sys.stderr)
        return 1
    adapter = " (the adapter's too)" if with_adapter else ""
    say(f"check: read back at {_text(model.layout)}, every shard bit-exact{adapter} ({count} on rank 0)")
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
    to = _target_format(args, source_is_hf)
    problem = _adapter_problem(args, source_is_hf)
    if problem:
        say(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        start = time.perf_counter()
        model = _load(args.src, args, None if args.dtype == "auto" else args.dtype)
        peft_model = _with_adapter(model, args.src, args.adapter)
        if peft_model is not None and args.merge_lora:
            model, peft_model = peft_model.merge_and_unload(), None
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        if to == "hf":
            model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
            if peft_model is not None:
                from ..peft import save_adapter

                save_adapter(peft_model, _adapter_folder(args))
        elif peft_model is not None:
            from ..peft import save_distributed_checkpoint

            save_distributed_checkpoint(peft_model, args.dst)
        else:
            model.save_distributed_checkpoint(args.dst)
        saved = time.perf_counter() - start
    except (MCoreTransformersError, ValueError) as err:
        say(f"error: {err}", file=sys.stderr)
        return 1

    what = "an HF folder" if to == "hf" else "a megatron-core distributed checkpoint"
    adapter = args.adapter or "its adapter"
    if args.merge_lora:
        what += f", {adapter} merged"
    elif peft_model is not None:
        what += f" + {_adapter_folder(args)} (the adapter)" if to == "hf" else f" with {adapter}'s state"
    say(f"converted {args.src} -> {args.dst} ({what}): {model.num_parameters():,} parameters, "
        f"{str(model.dtype).replace('torch.', '')} (load {loaded:.1f}s, save {saved:.1f}s at {_text(model.layout)})")
    saved_model = peft_model if peft_model is not None else model
    ok = args.no_check or _agree(_check(args, saved_model, to, source_is_hf, peft_model is not None) == 0)
    if ok and args.verify:  # the base weights against transformers; the adapter is not part of that check
        with peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext():
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
    convert.add_argument("--adapter", default=None,
                         help="an HF PEFT LoRA folder for this base: kept as adapter state in a distributed "
                              "checkpoint, written to DST/adapter/ beside an HF folder, or merged (--merge-lora)")
    convert.add_argument("--adapter-out", default=None,
                         help=f"where an HF result's adapter goes (default: DST/{ADAPTER_SUBFOLDER}/)")
    convert.add_argument("--merge-lora", action="store_true",
                         help="merge the adapter (--adapter, or the state SRC holds) into the weights before saving")
    convert.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default: %(default)s)")
    convert.add_argument("--no-check", action="store_true",
                         help="skip comparing the result with the source (or with the model, read back) afterwards")
    convert.add_argument("--verify", action="store_true",
                         help="afterwards, compare logits and loss with transformers on a random batch")
    convert.add_argument("--verify-seq-len", type=int, default=32, help=argparse.SUPPRESS)
