"""The `mcore-transformers` command: demo, verify, convert.

    mcore-transformers demo                          # the 2-process tour: load tp=2, verify, save, reload
    mcore-transformers verify PATH --tp 2            # HF-vs-mcore precision check; exit 1 past tolerance
    mcore-transformers convert HF_DIR DIST_DIR --tp 2       # HF -> megatron-core distributed checkpoint
    mcore-transformers convert DIST_DIR HF_DIR              # and back, at any layout

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

from .convert import add_convert_arguments
from .launch import STARTED_ENV, STORE_ENV, run_distributed, say, under_launcher

DTYPES = ("float32", "bfloat16", "float16")


def _layout_kwargs(args: argparse.Namespace) -> dict:
    return dict(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep)


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
    from .convert import run_convert

    return run_convert(args)


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
        "convert", help="HF folder <-> megatron-core distributed checkpoint, at any layout (or re-shard / cast)",
        description="The direction follows SRC: an HF folder (or Hub id) becomes a megatron-core distributed "
                    "checkpoint, a distributed checkpoint becomes an HF folder; --to overrides it. Each rank reads "
                    "only its own slices and writes only its own shards; the result is checked bit-exact.",
    )
    _add_layout(convert, sequence_parallel=False)
    add_convert_arguments(convert)
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
