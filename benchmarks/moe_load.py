"""Expert-parallel loading and export of a mixture-of-experts checkpoint.

    python benchmarks/moe_load.py             # launches itself under torchrun with 2 ranks (ep=2)
    python benchmarks/moe_load.py --ep 1      # the same model in one process, for comparison

Model: Qwen3-MoE layout, hidden 512, 8 routed experts (top-2) of intermediate size 768 on each of
8 layers, vocabulary 8000, bf16 (~89M parameters, ~179 MB), written once by transformers'
save_pretrained under /tmp/mcore_bench/qwen3moe-8x512 (per-expert tensors, as on the Hub).

Measured per rank:
- bytes read: `CheckpointReader.bytes_read` of the reader from_pretrained opens, and its share of all
  tensor bytes in the checkpoint. At ep=2 a rank reads every non-expert tensor and its 4 experts.
- load: wall time of from_pretrained (the second of two loads; the first warms the page cache).
- export: `export_hf_weights()` (every rank receives every tensor, expert by expert) and
  `save_pretrained` (rank 0 writes), as checkpoint bytes per second. One torch thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

ROOT = os.environ.get("MCORE_BENCH_DIR", "/tmp/mcore_bench")
FOLDER = os.path.join(ROOT, "qwen3moe-8x512")
CONFIG = dict(
    vocab_size=8000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=768, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
)


def make_checkpoint() -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.exists(os.path.join(FOLDER, "model.safetensors.index.json")) or os.path.exists(
        os.path.join(FOLDER, "model.safetensors")
    ):
        with open(os.path.join(FOLDER, "config.json")) as f:
            written = json.load(f)
        if all(written.get(k) == v for k, v in CONFIG.items()):
            return FOLDER
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **CONFIG), dtype=torch.bfloat16)
    tmp = FOLDER + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="64MB")
    shutil.rmtree(FOLDER, ignore_errors=True)
    os.rename(tmp, FOLDER)
    return FOLDER


def checkpoint_bytes(folder: str) -> int:
    from mcore_transformers.conversion.reader import CheckpointReader

    with CheckpointReader(folder) as reader:
        total = 0
        for name in reader.names():
            count = 1
            for size in reader.shape(name):
                count *= size
            total += count * reader.dtype(name).itemsize
        return total


def run(ep: int) -> dict:
    import torch.distributed as dist

    import mcore_transformers.model.loading as modeling  # where from_pretrained opens its reader
    from mcore_transformers import MCoreModelForCausalLM

    readers = []

    class CountingReader(modeling.CheckpointReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            readers.append(self)

    modeling.CheckpointReader = CountingReader
    torch.set_num_threads(1)  # one core per rank, the same for --ep 1 (2 cores, shared with other work)
    folder, total = FOLDER, checkpoint_bytes(FOLDER)
    MCoreModelForCausalLM.from_pretrained(folder, ep=ep, dtype=torch.bfloat16)  # warm-up: page cache, imports
    start = time.perf_counter()
    model = MCoreModelForCausalLM.from_pretrained(folder, ep=ep, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    bytes_read = readers[-1].bytes_read

    model.export_plan()  # the plan is gathered once; not part of the stream
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    exported = sum(tensor.numel() * tensor.element_size() for _, tensor in model.export_hf_weights())
    export_s = time.perf_counter() - start

    target = tempfile.mkdtemp(prefix="moe-save-", dir="/tmp")
    shutil.rmtree(target)
    if dist.is_initialized():
        target_list = [target]
        dist.broadcast_object_list(target_list, src=0)
        target = target_list[0]
    start = time.perf_counter()
    model.save_pretrained(target)
    save_s = time.perf_counter() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(target, ignore_errors=True)
    return dict(
        rank=dist.get_rank() if dist.is_initialized() else 0, ep=ep, checkpoint_bytes=total, bytes_read=bytes_read,
        read_share=bytes_read / total, load_s=load_s, exported_bytes=exported, export_s=export_s,
        export_gb_s=exported / export_s / 1e9, save_s=save_s, save_gb_s=total / save_s / 1e9,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    if not args.worker:
        make_checkpoint()
        if args.ep > 1:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            command = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ep}",
                f"--master_port={port}", os.path.abspath(__file__), "--worker", "--ep", str(args.ep),
            ]
            sys.exit(subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    result = run(args.ep)
    print(json.dumps(result), flush=True)
    share = result["read_share"]
    print(
        f"rank {result['rank']} (ep={result['ep']}): read {result['bytes_read'] / 1e6:.1f} of "
        f"{result['checkpoint_bytes'] / 1e6:.1f} MB ({share:.1%}), load {result['load_s']:.2f}s, "
        f"export_hf_weights {result['export_gb_s']:.2f} GB/s, save_pretrained {result['save_gb_s']:.2f} GB/s",
        flush=True,
    )


if __name__ == "__main__":
    main()
