"""Peak memory and time of `mcore-transformers convert` per rank: HF ⇄ megatron-core distributed checkpoint.

    python benchmarks/convert_memory.py            # the ~314M-parameter bf16 checkpoint (627 MB), worlds 1 and 2
    python benchmarks/convert_memory.py --small    # ~7M parameters: sanity check
    python benchmarks/convert_memory.py --check    # include the command's read-back check (a second copy)
    python benchmarks/convert_memory.py --moe      # the ~89M Qwen3-MoE of moe_load.py, experts over ep (world 2)

For each world size and direction the command runs under torchrun (one process for world 1), as users run
it. Each rank records its RSS after the imports, resets the peak (/proc/self/clear_refs), runs the
command and reads VmHWM: peak delta = VmHWM − RSS before. The goal (issue: bounded memory) is a peak
delta per rank ≤ 1.5 × (checkpoint bytes / world size) + a constant. Pages of mapped safetensors
shards count once touched, as in load_save.py. Median of --repeats runs; the spread is min..max.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def worker(argv: list[str], report: str) -> None:
    """One rank: run the command, append {rank, seconds, peak delta} to `report`."""
    from load_save import proc_status, reset_peak_rss

    import torch  # noqa: F401  (the imports are not what is measured)
    import transformers  # noqa: F401
    from mcore_transformers.tools.cli import main

    import gc

    gc.collect()
    before = proc_status()["VmRSS"]
    reset_peak_rss()
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    peak = proc_status()["VmHWM"] - before
    with open(report, "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "code": code, "seconds": seconds,
                            "peak": peak}) + "\n")


def run(world: int, argv: list[str], scratch: str) -> list[dict]:
    report = os.path.join(scratch, "report.jsonl")
    if os.path.exists(report):
        os.remove(report)
    script = [os.path.abspath(__file__), "--worker", report, "--", *argv]
    if world == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)), PYTHONWARNINGS="ignore",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(report):
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(report) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--check", action="store_true", help="keep the command's read-back check")
    parser.add_argument("--moe", action="store_true", help="the MoE checkpoint of moe_load.py, ep = world size")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from load_save import checkpoint_bytes
    from make_checkpoint import make_checkpoint

    if args.moe:
        from moe_load import make_checkpoint as make_moe_checkpoint

        source = make_moe_checkpoint()
    else:
        source = make_checkpoint(small=args.small)
    total = checkpoint_bytes(source)
    check = [] if args.check else ["--no-check"]
    rows = []
    print(f"checkpoint: {source}, {total / 2**20:.0f} MiB of tensors; peak = per-rank peak RSS above the imports")
    print(f"{'world':>5} {'direction':<18} {'seconds (median, min..max)':<28} {'peak MiB (max rank)':>20} "
          f"{'share MiB':>10} {'peak/share':>10}")
    for world in [int(w) for w in args.worlds.split(",")]:
        layout = ["--ep" if args.moe else "--tp", str(world)] if world > 1 else []
        with tempfile.TemporaryDirectory(prefix="mcore-convert-bench-") as scratch:
            dist_dir, hf_dir = os.path.join(scratch, "dist"), os.path.join(scratch, "hf")
            steps = [("HF -> distributed", [source, dist_dir], dist_dir),
                     ("distributed -> HF", [dist_dir, hf_dir], hf_dir)]
            for direction, (src, dst), written in steps:
                seconds, peaks = [], []
                for repeat in range(args.repeats):
                    if repeat and os.path.exists(written):
                        shutil.rmtree(written)
                    if direction == "distributed -> HF" and not os.path.exists(dist_dir):
                        run(world, ["convert", source, dist_dir, *layout, "--no-check"], scratch)
                    ranks = run(world, ["convert", src, dst, *layout, *check], scratch)
                    seconds.append(max(r["seconds"] for r in ranks))
                    peaks.append(max(r["peak"] for r in ranks))
                share = total / world
                peak = statistics.median(peaks)
                row = {"world": world, "direction": direction, "seconds": seconds, "peaks": peaks,
                       "share": share, "ratio": peak / share}
                rows.append(row)
                spread = f"{statistics.median(seconds):.1f} ({min(seconds):.1f}..{max(seconds):.1f})"
                print(f"{world:>5} {direction:<18} {spread:<28} {peak / 2**20:>20.0f} {share / 2**20:>10.0f} "
                      f"{peak / share:>10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": source, "bytes": total, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[sys.argv.index("--") + 1:], sys.argv[2])
    else:
        main()
