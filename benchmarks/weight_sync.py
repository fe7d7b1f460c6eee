"""Weight sync speed: `update_weights` from a tp=2 megatron-core model into a running vLLM engine (its worker in its
own process, gloo on CPU), against a single-process memcpy of the same bytes (the limit on one machine).

    ./dev vllm --collect-only -q >/dev/null            # makes .venv-vllm once
    .venv-vllm/bin/python benchmarks/weight_sync.py     # ~314M bf16 model (benchmarks/make_checkpoint.py)
    .venv-vllm/bin/python benchmarks/weight_sync.py --small

It starts itself under torchrun with 2 ranks. Per mode (buckets of --bucket-mib, and one collective per tensor) it
runs --repeats updates after a warm-up one and prints medians (min–max): the whole update in GB/s and as a ratio of
memcpy, the sender's stages (gather over tp, pack into buckets, transport), the engine's own load_weights time and
its share, and each rank's peak extra memory during an update (VmHWM, reset before it) against two buckets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _rss_peak_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _folder(small: bool) -> str:
    """The benchmark checkpoint with the demo tokenizer beside it (vLLM needs a tokenizer)."""
    import mcore_transformers
    from make_checkpoint import make_checkpoint

    source = make_checkpoint(small=small)
    folder = source + "-with-tokenizer"
    if not os.path.exists(os.path.join(folder, "config.json")):
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(source):
            os.symlink(os.path.join(source, name), os.path.join(folder, name))
        demo = os.path.join(os.path.dirname(mcore_transformers.__file__), "assets", "demo-model")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(demo, name), os.path.join(folder, name))
    return folder


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers.utils import logging

    logging.set_verbosity_error()
    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.vllm import start_engine, update_weights

    folder = _folder(args.small)
    model = MCoreModelForCausalLM.from_pretrained(folder, tp=2, dtype=torch.bfloat16)
    rank = dist.get_rank()
    engine = start_engine(folder, dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0) if rank == 0 else None
    update_weights(model, engine, bucket_bytes=args.bucket_mib * 2**20)  # warm-up: the group is made here
    modes = {f"buckets of {args.bucket_mib} MiB": args.bucket_mib * 2**20, "buckets of 64 MiB": 64 * 2**20,
             "one collective per tensor": None}
    results = {}
    for label, bucket_bytes in modes.items():
        runs = []
        for _ in range(args.repeats):
            dist.barrier()
            before = _rss_peak_reset()
            report = update_weights(model, engine, bucket_bytes=bucket_bytes)
            peak = _status("VmHWM") - before
            peaks = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, peak)
            runs.append((report, peaks))
        results[label] = runs
    if rank == 0:
        nbytes = results[next(iter(results))][0][0].bytes
        source = torch.randn(nbytes // 4)
        target = torch.zeros_like(source)  # touched once: page faults are not what memcpy costs
        copies = []
        for _ in range(6):
            began = time.perf_counter()
            target.copy_(source)
            copies.append(time.perf_counter() - began)
        copies = copies[1:]
        memcpy = nbytes / statistics.median(copies) / 1e9
        print(f"\nweight sync of {nbytes / 2**20:.0f} MiB (bf16, tp=2 -> vLLM engine in its own process, gloo); "
              f"memcpy of the same bytes: {memcpy:.2f} GB/s (median of 5)\n")
        for label, runs in results.items():
            print(f"{label}: {runs[0][0].buckets} buckets")
            totals = [r.seconds["total"] for r, _ in runs]
            gbps = [r.gbps for r, _ in runs]
            print(f"  whole update   {_med(totals)} s   {_med(gbps)} GB/s   {statistics.median(gbps) / memcpy:.2f}x memcpy")
            for stage in ("gather", "pack", "transport"):
                print(f"  {stage:<14} {_med([r.seconds[stage] for r, _ in runs])} s")
            loads = [r.engine.get("load_weights_s", 0.0) for r, _ in runs]
            share = statistics.median(loads) / statistics.median(totals)
            print(f"  load_weights   {_med(loads)} s   ({100 * share:.0f}% of the update, in the engine)")
            bucket = args.bucket_mib * 2**20
            for rank_index in range(len(runs[0][1])):
                peaks = [p[rank_index] / 2**20 for _, p in runs]
                print(f"  peak extra memory rank {rank_index}: {_med(peaks, 0)} MiB (two buckets: {2 * bucket / 2**20:.0f} MiB)")
            print()


def _med(values, digits: int = 3) -> str:
    middle, low, high = statistics.median(values), min(values), max(values)
    return f"{middle:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a ~7M model instead of ~314M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    _folder(args.small)  # written once, before the ranks start
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--repeats", str(args.repeats), "--bucket-mib", str(args.bucket_mib)]
    sys.exit(subprocess.call(command + (["--small"] if args.small else []), env=env))


if __name__ == "__main__":
    main()
