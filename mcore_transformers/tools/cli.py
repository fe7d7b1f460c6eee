"""The `mcore-transformers` command: demo, verify, convert.

    mcore-transformers demo                          # the 2-process tour: load tp=2, verify, save, reload
    mcore-transformers verify PATH --tp 2            # HF-vs-mcore precision check; exit 1 past tolerance
    mcore-transformers convert SRC DST --dtype bfloat16 --max-shard-size 2GB

Multi-process commands start their own local processes (`--nproc`, default: what the layout needs),
so no launcher is needed on one machine. Under torchrun (WORLD_SIZE set) they join the running world
instead: `torchrun --nproc_per_node=8 --no-python mcore-transformers verify PATH --tp 8`.
Only global rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from .compare import compare_folders
from .launch import STARTED_ENV, STORE_ENV, is_rank0, run_distributed, say, under_launcher

DTYPES = ("float32", "bfloat16", "float16")


def _layout_kwargs(args: argparse.Namespace) -> dict:
    return dict(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep)


def _layout_text(layout) -> str:
    text = f"tp={layout.tp} pp={layout.pp}"
    text += f" vpp={layout.vpp}" if layout.vpp else ""
    text += f" ep={layout.ep}" if layout.ep > 1 else ""
    return text


def _default_nproc(args: argparse.Namespace) -> int:
    """The fewest processes the layout needs: tp·pp model-parallel ranks, times ep for the experts."""
    return args.nproc or args.tp * args.pp * args.ep


def _user_error(err: Exception) -> int:
    say(f"error: {err}", file=sys.stderr)
    return 1


# ---- verify --------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    from ..errors import MCoreTransformersError
    from .verify import VerificationError, verify

    try:
        report = verify(
            args.path, **_layout_kwargs(args), sequence_parallel=args.sequence_parallel, dtype=args.dtype,
            batch_size=args.batch_size, seq_len=args.seq_len, atol=args.atol, seed=args.seed,
            loss_atol=args.loss_atol,
        )
    except VerificationError as err:
        say(err.report)
        say("mcore and transformers disagree beyond the tolerances above.", file=sys.stderr)
        return 1
    except (MCoreTransformersError, ValueError, RuntimeError) as err:
        return _user_error(err)
    say(report)
    return 0


# ---- convert -------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from ..errors import MCoreTransformersError
    from ..model.causal_lm import MCoreModelForCausalLM

    if os.path.realpath(args.src) == os.path.realpath(args.dst):
        return _user_error(ValueError(f"SRC and DST are the same folder ({args.src}): choose a new DST."))
    try:
        start = time.perf_counter()
        model = MCoreModelForCausalLM.from_pretrained(
            args.src, **_layout_kwargs(args), dtype=None if args.dtype == "auto" else args.dtype
        )
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
        saved = time.perf_counter() - start
    except (MCoreTransformersError, ValueError) as err:
        return _user_error(err)

    code = 0
    if is_rank0():
        dtype = str(model.dtype).replace("torch.", "")
        files = sorted(f for f in os.listdir(args.dst) if f.endswith(".safetensors"))
        size = sum(os.path.getsize(os.path.join(args.dst, f)) for f in files)
        print(f"converted {args.src} -> {args.dst}: {model.num_parameters():,} parameters, {dtype}, "
              f"{len(files)} safetensors file(s), {size / 2**20:.1f} MiB "
              f"(load {loaded:.1f}s at {_layout_text(model.layout)}, save {saved:.1f}s)", flush=True)
        if not args.no_check:
            count, cast, problems = compare_folders(model.source_folder, args.dst, dtype=model.dtype)
            if problems:
                print(f"check FAILED: {'; '.join(problems)}", file=sys.stderr, flush=True)
                code = 1
            else:
                how = f"bit-exact after the cast to {dtype}" if cast else "bit-exact"
                print(f"check: all {count} tensors equal the source ({how})", flush=True)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        flag = [code]
        torch.distributed.broadcast_object_list(flag, src=0)
        code = flag[0]
    return code


# ---- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# ---- argument parsing ----------------------------------------------------------------------------
def _add_layout(parser: argparse.ArgumentParser, sequence_parallel: bool = True) -> None:
    group = parser.add_argument_group("parallel layout")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    group.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (needs --pp >= 2)")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    if sequence_parallel:
        group.add_argument("--sequence-parallel", action="store_true", help="split the sequence across TP ranks")
    group.add_argument("--nproc", type=int, default=None,
                       help="local processes to start (default: tp·pp·ep; ignored under torchrun)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcore-transformers",
        description="Megatron-Core speed and parallelism behind the transformers API.",
        epilog="Run `mcore-transformers demo` for a two-process tour on this machine (no network needed).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="load a small model with tp=2 on 2 local processes, verify, save, reload")
    demo.add_argument("--output", default="./mcore-demo-output",
                      help="where to save the HF folder (default: %(default)s)")
    demo.add_argument("--nproc", type=int, default=2, help="local processes (default: %(default)s)")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default: %(default)s)")
    demo.add_argument("--model", default=None,
                      help="an HF folder to use instead of the demo model (default: the shipped demo model, "
                           "or a small random llama written by transformers)")
    demo.set_defaults(func=cmd_demo, nproc_of=lambda a: a.nproc)

    verify = commands.add_parser("verify", help="compare the mcore model with transformers; exit 1 past tolerance")
    verify.add_argument("path", help="HF model folder or Hub id")
    _add_layout(verify)
    verify.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
    verify.add_argument("--batch-size", type=int, default=2, help="(default: %(default)s)")
    verify.add_argument("--seq-len", type=int, default=32, help="(default: %(default)s)")
    verify.add_argument("--atol", type=float, default=None, help="max |Δ logit| allowed (default: by dtype)")
    verify.add_argument("--loss-atol", type=float, default=None, help="|Δ loss| allowed (default: by dtype)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random batch (default: %(default)s)")
    verify.set_defaults(func=cmd_verify, nproc_of=_default_nproc)

    convert = commands.add_parser(
        "convert", help="load SRC into megatron-core and save it back as an HF folder (re-sharded, optionally cast)",
        description="An HF -> mcore -> HF copy: the weights go through the same load and export paths as "
                    "training and RL weight sync; config and tokenizer files are copied verbatim. "
                    "Use it to re-shard, to cast (--dtype), or to check a checkpoint round-trips exactly.",
    )
    convert.add_argument("src", help="HF model folder or Hub id")
    convert.add_argument("dst", help="new folder to write")
    _add_layout(convert, sequence_parallel=False)
    convert.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                         help="dtype of the saved weights (default: the checkpoint's)")
    convert.add_argument("--max-shard-size", default="5GB", help="(default: %(default)s)")
    convert.add_argument("--no-check", action="store_true",
                         help="skip comparing every saved tensor with the source afterwards")
    convert.set_defaults(func=cmd_convert, nproc_of=_default_nproc)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The demo's ranks start quiet: the import-time warnings of megatron (no Apex / TE) are noise there.
    extra_env = {STARTED_ENV: str(started)}
    if args.command == "demo":
        extra_env["PYTHONWARNINGS"] = "ignore"
    code = run_distributed(args.func, args, args.nproc_of(args), argv, extra_env)
    if under_launcher() and STORE_ENV in os.environ:
        # A rank we started: wait for the others, then skip the interpreter's teardown of torch,
        # transformers and megatron (seconds on a busy machine; nothing is left to flush but stdio).
        import torch.distributed as dist

        if dist.is_initialized() and code == 0:  # a failing rank leaves at once; the parent stops the rest
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
