"""Loading / saving / forward speed of MCoreModelForCausalLM against transformers and a raw safetensors read.

    python benchmarks/load_save.py            # ~314M-parameter bf16 Qwen2-style checkpoint (a few minutes)
    python benchmarks/load_save.py --small    # ~7M parameters: sanity check (~30 s on an idle machine)
    python benchmarks/load_save.py --help     # repeats, threads, --json / --summarize, ...

One command runs everything: the tp=1 part in this process (transformers and mcore side by side,
interleaved, so machine load hits both alike), then the tp=2 part under torchrun (launched here).
The checkpoint is written once under /tmp/mcore_bench by benchmarks/make_checkpoint.py.

What is measured (see benchmarks/README.md for the full definitions):
- load: wall time of `from_pretrained`, warm (one untimed warm-up load of each kind first, in the same
  process; transformers' first call carries ~2 s of one-off set-up). Median of --repeats runs.
- raw read (clone): `safe_open` + `get_tensor` + `.clone()` of every tensor of every shard.
- raw read (readinto): each shard's data section read with `readinto` into one fresh buffer, then viewed
  as the tensors (no extra copy).
- bytes read: `CheckpointReader.bytes_read` (bytes of the whole tensors / slices the reader handed out),
  captured by wrapping `CheckpointReader.__init__`; relative to the bytes of all tensors in the files.
- peak RSS: /proc/self/status VmHWM is reset (`echo 5 > /proc/self/clear_refs`) right before the load;
  peak delta = VmHWM after − VmRSS before. It counts anonymous memory (copies) and the file-backed pages
  of mapped shards that were touched while mapped; mapped tensors kept zero-copy count only once touched.
- save: wall time of `save_pretrained` into a new folder under --save-dir (same max_shard_size for both).
- forward: one no-grad forward of a 4x128 batch (informative).
Every timing also records the process's CPU time; on this shared 2-CPU machine compare ratios, the `cpu`
and `min` columns, and several runs pooled with --summarize (README: "Noise on this machine").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_checkpoint import ROOT, make_checkpoint  # noqa: E402

DTYPE = torch.bfloat16
SAVE_SHARD_SIZE = "5GB"  # both libraries get the same value (one file for these models)
SAVE_DIR = [ROOT]  # --save-dir
BATCH, SEQ = 4, 128

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---- helpers -----------------------------------------------------------------------------------
def quiet_libraries() -> None:
    """No progress bars: transformers' switch, and mcore's own bars (they pass disable= explicitly)."""
    import importlib
    import pkgutil

    import mcore_transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    def silencer(bar):
        def silent(*args, **kwargs):
            kwargs["disable"] = True
            return bar(*args, **kwargs)
        return silent

    for info in pkgutil.walk_packages(mcore_transformers.__path__, "mcore_transformers."):
        if info.name.endswith((".cli", "__main__")):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # optional parts (e.g. a trainer needing extra packages)
            continue
        if callable(getattr(module, "tqdm", None)):
            module.tqdm = silencer(module.tqdm)


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) * 1024
    return out


def checkpoint_rss(folder: str) -> int:
    """Resident bytes of this process's mappings of files under `folder` (from /proc/self/smaps): the
    checkpoint pages that count in RSS. A page mapped twice (two live mappings) counts twice."""
    folder = os.path.realpath(folder) + os.sep
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if first.endswith(":"):
                if inside and first == "Rss:":
                    total += int(line.split()[1]) * 1024
            else:  # a mapping header: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                inside = len(parts) == 6 and parts[5].strip().startswith(folder)
    return total


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(fn):
    """(seconds, result, peak RSS delta in bytes, extra) of one call of fn; extra has the CPU seconds
    of this process (all threads) and the RSS / RssAnon / RssFile deltas after the call."""
    gc.collect()
    before = proc_status()
    reset_peak_rss()
    cpu = time.process_time()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    after = proc_status()
    return seconds, result, after["VmHWM"] - before["VmRSS"], {
        "cpu": cpu,
        "rss": after["VmRSS"] - before["VmRSS"],
        "anon": after["RssAnon"] - before["RssAnon"],
        "file": after["RssFile"] - before["RssFile"],
    }


def shard_paths(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    return [os.path.join(folder, name) for name in files]


def read_header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def checkpoint_bytes(folder: str) -> int:
    """Bytes of all tensors in the checkpoint's safetensors files."""
    total = 0
    for path in shard_paths(folder):
        _, header = read_header(path)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


# ---- the things being timed --------------------------------------------------------------------
def raw_clone(folder: str) -> dict:
    """safe_open + get_tensor + clone of every tensor: every byte copied once out of the mapping."""
    from safetensors import safe_open

    out = {}
    for path in shard_paths(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).clone()
    return out


def raw_readinto(folder: str) -> dict:
    """Each shard's data section read with readinto into one fresh buffer; tensors are views of it."""
    out = {}
    for path in shard_paths(folder):
        data_start, header = read_header(path)
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size - data_start
            buffer = torch.empty(size, dtype=torch.uint8)
            view = memoryview(buffer.numpy())
            f.seek(data_start)
            done = 0
            while done < size:
                got = f.readinto(view[done:])
                if not got:
                    raise IOError(f"{path}: short read")
                done += got
        for name, info in header.items():
            start, stop = info["data_offsets"]
            out[name] = buffer[start:stop].view(_ST_DTYPES[info["dtype"]]).view(info["shape"])
    return out


def hf_load(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE)


def mcore_load(folder: str, tp: int = 1):
    from mcore_transformers import MCoreModelForCausalLM

    return MCoreModelForCausalLM.from_pretrained(folder, tp=tp, dtype=DTYPE)


class ReaderSpy:
    """Keeps every CheckpointReader built, so bytes_read can be read after from_pretrained returns."""

    def __init__(self):
        from mcore_transformers.conversion.reader import CheckpointReader

        self.readers = []
        original = CheckpointReader.__init__
        spy = self

        def init(reader, *args, **kwargs):
            original(reader, *args, **kwargs)
            spy.readers.append(reader)

        CheckpointReader.__init__ = init

    def take(self) -> int:
        total = sum(reader.bytes_read for reader in self.readers)
        self.readers.clear()
        return total


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def time_forward(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - start


def load_and_forward(load, ids: torch.Tensor, folder: str):
    """(model, first forward, its logits, checkpoint pages resident after it). The first forward also
    faults in the pages of weights kept as zero-copy mappings (the read a zero-copy load defers); the
    last value is what those mappings cost in RSS once the weights are used."""
    gc.collect()
    model = load()
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(input_ids=ids).logits
        first = time.perf_counter() - start
    return model, first, logits, checkpoint_rss(folder)


def time_saves(save, repeats: int, on_first=None, is_writer: bool = True, barrier=None) -> tuple[list, list]:
    """(wall seconds, CPU seconds of this process) of `repeats` saves into new folders under SAVE_DIR."""
    times, cpus = [], []
    for i in range(repeats):
        target = os.path.join(SAVE_DIR[0], f"save-{os.getpid()}-{i}") if is_writer else None
        if barrier:
            target = broadcast_str(target)
            barrier()
        gc.collect()
        cpu = time.process_time()
        start = time.perf_counter()
        save(target)
        if barrier:
            barrier()
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        if is_writer:
            if i == 0 and on_first:
                on_first(target)
            shutil.rmtree(target, ignore_errors=True)
    return times, cpus


def broadcast_str(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compare_folder(saved: str, source: str) -> float:
    """Max |difference| between every tensor of two checkpoints (inf when names differ)."""
    a, b = raw_clone(saved), raw_clone(source)
    if set(a) != set(b):
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- tp=1 (this process) -----------------------------------------------------------------------
def run_tp1(folder: str, repeats: int, save_repeats: int, forward_repeats: int) -> dict:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    spy = ReaderSpy()
    res: dict = {"cold": {}}
    kinds = {
        "hf": lambda: hf_load(folder),
        "mcore": lambda: mcore_load(folder),
        "raw_clone": lambda: raw_clone(folder),
        "raw_readinto": lambda: raw_readinto(folder),
    }
    for name, fn in kinds.items():  # warm-up: one-off set-up, imports, page cache
        res["cold"][name] = measure(fn)[0]
    spy.take()
    times, cpus, peaks, after = ({name: [] for name in kinds} for _ in range(4))
    order = list(kinds)
    for r in range(repeats):
        for name in order[r % len(order):] + order[: r % len(order)]:  # rotate: no kind always first
            seconds, result, peak, extra = measure(kinds[name])
            times[name].append(seconds)
            cpus[name].append(extra["cpu"])
            peaks[name].append(peak)
            after[name].append(extra)
            del result
    res["bytes_read"] = spy.take() / repeats
    res["load"] = {name: stats(v) for name, v in times.items()}
    res["load_cpu"] = {name: stats(v) for name, v in cpus.items()}
    res["peak"] = {name: stats(v) for name, v in peaks.items()}
    res["after"] = after

    ids = batch(vocab)
    hf_model, hf_first, hf_logits, hf_file = load_and_forward(lambda: hf_load(folder), ids, folder)
    mc_model, mc_first, mc_logits, mc_file = load_and_forward(lambda: mcore_load(folder), ids, folder)
    mc_file -= hf_file  # both models are alive: the HF model's mapped pages are still counted
    res["forward_first"] = {"hf": hf_first, "mcore": mc_first}
    res["mapped_after_forward"] = {"hf": hf_file, "mcore": mc_file}
    res["forward_max_abs_diff"] = (hf_logits.float() - mc_logits.float()).abs().max().item()
    del hf_logits, mc_logits
    models = {"hf": hf_model, "mcore": mc_model}
    forwards = {name: [] for name in models}
    for r in range(forward_repeats):  # interleaved, rotating order
        for name in list(models)[r % 2:] + list(models)[: r % 2]:
            forwards[name].append(time_forward(models[name], ids))
    res["forward"] = {name: stats(v) for name, v in forwards.items()}

    check = {}
    saves = {
        "hf": lambda t: hf_model.save_pretrained(t, max_shard_size=SAVE_SHARD_SIZE),
        "mcore": lambda t: mc_model.save_pretrained(t, max_shard_size=SAVE_SHARD_SIZE),
    }
    # untimed warm-up save of each; mcore's is read back and compared with the source
    time_saves(saves["hf"], 1)
    time_saves(saves["mcore"], 1, on_first=lambda t: check.setdefault("diff", compare_folder(t, folder)))
    save_times, save_cpus = ({name: [] for name in saves} for _ in range(2))
    for r in range(save_repeats):  # interleaved, rotating order
        for name in list(saves)[r % 2:] + list(saves)[: r % 2]:
            wall, cpu = time_saves(saves[name], 1)
            save_times[name] += wall
            save_cpus[name] += cpu
    res["save"] = {name: stats(v) for name, v in save_times.items()}
    res["save_cpu"] = {name: stats(v) for name, v in save_cpus.items()}
    res["save_roundtrip_max_abs_diff"] = check["diff"]

    # The tensors a save writes, without the file: what each library does before safetensors serialises.
    streams = {
        "hf": lambda: [t.contiguous() for t in hf_model.state_dict().values()],
        "mcore": lambda: [t.contiguous() for _, t in mc_model.export_hf_weights()],
    }
    stream_times = {name: [] for name in streams}
    for r in range(save_repeats):
        for name in list(streams)[r % 2:] + list(streams)[: r % 2]:
            stream_times[name].append(measure(streams[name])[0])
    res["export_stream"] = {name: stats(v) for name, v in stream_times.items()}
    return res


# ---- tp=2 (torchrun workers) -------------------------------------------------------------------
def tp2_worker(folder: str, out_dir: str, repeats: int, save_repeats: int, forward_repeats: int) -> None:
    import torch.distributed as dist

    quiet_libraries()
    spy = ReaderSpy()
    rank = int(os.environ["RANK"])
    cold_s, model, cold_peak, _ = measure(lambda: mcore_load(folder, tp=2))
    del model
    spy.take()
    times, cpus, peaks, after, read = [], [], [], [], []
    for _ in range(repeats):
        dist.barrier()
        seconds, model, peak, extra = measure(lambda: mcore_load(folder, tp=2))
        times.append(seconds)
        cpus.append(extra["cpu"])
        peaks.append(peak)
        after.append(extra)
        read.append(spy.take())
        del model
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    model, fwd_first, _, mapped = load_and_forward(lambda: mcore_load(folder, tp=2), batch(vocab), folder)
    fwd_times = [time_forward(model, batch(vocab)) for _ in range(forward_repeats)]
    save_times, save_cpus = time_saves(
        lambda t: model.save_pretrained(t, max_shard_size=SAVE_SHARD_SIZE), save_repeats,
        is_writer=rank == 0, barrier=dist.barrier,
    )
    result = {
        "rank": rank, "cold": cold_s, "cold_peak": cold_peak, "load": times, "load_cpu": cpus, "peak": peaks,
        "after": after, "bytes_read": read, "forward_first": fwd_first, "forward": fwd_times,
        "mapped_after_forward": mapped, "save": save_times, "save_cpu": save_cpus,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def run_tp2(folder: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=ROOT) as out_dir:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", os.path.abspath(__file__), "--tp2-worker", out_dir,
            "--repeats", str(args.repeats), "--save-repeats", str(args.save_repeats),
            "--forward-repeats", str(args.forward_repeats), "--threads", str(args.threads), "--checkpoint", folder,
            "--save-dir", args.save_dir,
        ]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"tp=2 workers failed (exit {proc.returncode})")
        results = []
        for r in range(2):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results.append(json.load(f))
        return results


# ---- report ------------------------------------------------------------------------------------
def fmt_s(st: dict) -> str:
    return f"{st['median']:.3f}s [{st['min']:.3f}-{st['max']:.3f}]"


def report(folder: str, total: int, tp1: dict, tp2: list[dict] | None, threads: int, loadavg) -> list[tuple]:
    MB = 1e6
    rows = []  # (measurement, mcore, reference, ratio, min ratio, cpu ratio, target, verdict)

    def cpu_ratio(cpu: dict | None, a: str, b: str) -> str:
        return f"{cpu[a]['median'] / cpu[b]['median']:.2f}" if cpu else ""

    def target(what, mine, ref, ratio, limit, cpu="", best=""):
        rows.append((what, mine, ref, f"{ratio:.2f}", best, cpu, f"<= {limit:g}", "PASS" if ratio <= limit else "FAIL"))

    def info(what, mine, ref, ratio="", cpu="", best=""):
        rows.append((what, mine, ref, ratio, best, cpu, "info", ""))

    def min_ratio(a: dict, b: dict) -> str:
        return f"{a['min'] / b['min']:.2f}"

    L, LC = tp1["load"], tp1["load_cpu"]
    for ref, what, limit in (("hf", "HF from_pretrained (warm)", 1.0), ("raw_clone", "raw read (safe_open+clone)", 1.5),
                             ("raw_readinto", "raw read (readinto)", 1.5)):
        target(f"load tp=1 vs {what}", fmt_s(L["mcore"]), fmt_s(L[ref]), L["mcore"]["median"] / L[ref]["median"], limit,
               cpu_ratio(LC, "mcore", ref), min_ratio(L["mcore"], L[ref]))
    info("bytes read tp=1 (of checkpoint)", f"{tp1['bytes_read'] / MB:.0f} MB", f"{total / MB:.0f} MB",
         f"{tp1['bytes_read'] / total:.2f}")
    P = tp1["peak"]
    info("peak RSS delta tp=1 load, mcore vs HF", f"{P['mcore']['median'] / MB:.0f} MB", f"{P['hf']['median'] / MB:.0f} MB")
    anon = statistics.median(a["anon"] for a in tp1["after"]["mcore"])
    filed = statistics.median(a["file"] for a in tp1["after"]["mcore"])
    info("  mcore RSS after tp=1 load: anon / file", f"{anon / MB:.0f} MB", f"{filed / MB:.0f} MB")
    info("peak RSS delta, raw clone vs readinto", f"{P['raw_clone']['median'] / MB:.0f} MB",
         f"{P['raw_readinto']['median'] / MB:.0f} MB")
    if tp2:
        share = total / 2
        read = max(max(r["bytes_read"]) for r in tp2)
        target("tp=2 bytes read per rank (max rank)", f"{read / MB:.0f} MB", f"{total / MB:.0f} MB", read / total, 0.55)
        peak = max(max(r["peak"]) for r in tp2)
        target("tp=2 peak RSS delta per rank (max rank, run)", f"{peak / MB:.0f} MB", f"share {share / MB:.0f} MB",
               peak / share, 1.5)
        cold_peak = max(r["cold_peak"] for r in tp2)
        info("tp=2 peak RSS delta, first load in process", f"{cold_peak / MB:.0f} MB", f"share {share / MB:.0f} MB",
             f"{cold_peak / share:.2f}")
        after = max(statistics.median(a["rss"] for a in r["after"]) for r in tp2)
        anon2 = max(statistics.median(a["anon"] for a in r["after"]) for r in tp2)
        info("tp=2 RSS delta after load (anon part)", f"{after / MB:.0f} MB ({anon2 / MB:.0f} anon)",
             f"share {share / MB:.0f} MB", f"{after / share:.2f}")
        mapped2 = max(r["mapped_after_forward"] for r in tp2)
        info("tp=2 checkpoint pages resident after forward", f"{mapped2 / MB:.0f} MB", f"share {share / MB:.0f} MB",
             f"{mapped2 / share:.2f}")
        load2 = stats([max(a, b) for a, b in zip(tp2[0]["load"], tp2[1]["load"])])
        info("load tp=2 (slowest rank) vs HF tp=1", fmt_s(load2), fmt_s(L["hf"]), f"{load2['median'] / L['hf']['median']:.2f}",
             best=min_ratio(load2, L["hf"]))
    S, SC = tp1["save"], tp1["save_cpu"]
    target("save tp=1 vs HF save_pretrained", fmt_s(S["mcore"]), fmt_s(S["hf"]), S["mcore"]["median"] / S["hf"]["median"],
           1.0, cpu_ratio(SC, "mcore", "hf"), min_ratio(S["mcore"], S["hf"]))
    if "export_stream" in tp1:
        E = tp1["export_stream"]
        info("  tensors to write, no file: export vs state_dict", fmt_s(E["mcore"]), fmt_s(E["hf"]),
             f"{E['mcore']['median'] / E['hf']['median']:.2f}", best=min_ratio(E["mcore"], E["hf"]))
    if tp2:
        save2 = stats(tp2[0]["save"])
        cpu2 = f"{statistics.median(tp2[0]['save_cpu']) / SC['hf']['median']:.2f}"
        info("save tp=2 (rank 0) vs HF save (tp=1)", fmt_s(save2), fmt_s(S["hf"]),
             f"{save2['median'] / S['hf']['median']:.2f}", cpu2, min_ratio(save2, S["hf"]))
    F, FF = tp1["forward"], tp1["forward_first"]
    info(f"forward {BATCH}x{SEQ} tp=1 vs HF", fmt_s(F["mcore"]), fmt_s(F["hf"]), f"{F['mcore']['median'] / F['hf']['median']:.2f}",
         best=min_ratio(F["mcore"], F["hf"]))
    info("  first forward after load (faults mapped pages)", f"{FF['mcore']:.3f}s", f"{FF['hf']:.3f}s",
         f"{FF['mcore'] / FF['hf']:.2f}")
    M = tp1["mapped_after_forward"]
    info("  checkpoint pages resident after forward", f"{M['mcore'] / MB:.0f} MB", f"{M['hf'] / MB:.0f} MB")
    if tp2:
        fwd2 = stats(tp2[0]["forward"])
        info(f"forward {BATCH}x{SEQ} tp=2 vs HF tp=1", fmt_s(fwd2), fmt_s(F["hf"]), f"{fwd2['median'] / F['hf']['median']:.2f}",
             best=min_ratio(fwd2, F["hf"]))
    C = tp1["cold"]
    info("first load in the process, mcore vs HF", f"{C['mcore']:.3f}s", f"{C['hf']:.3f}s", f"{C['mcore'] / C['hf']:.2f}")
    info("first raw read, clone vs readinto", f"{C['raw_clone']:.3f}s", f"{C['raw_readinto']:.3f}s")

    headers = ("measurement", "mcore", "reference", "ratio", "min", "cpu", "target", "")
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(f"checkpoint {folder}: {total / 1e6:.0f} MB of tensors ({str(DTYPE).replace('torch.', '')}), "
          f"torch threads {threads} (tp=2: {threads} per rank), {os.cpu_count()} CPUs, "
          f"load average {loadavg[0]:.2f} / {loadavg[1]:.2f} (start / end, or min / max over pooled runs)")
    print("times: median [min-max] of the runs (wall). ratio = mcore median / reference median (wall; the PASS/FAIL); "
          "min = ratio of the fastest runs;\ncpu = ratio of median CPU seconds of the process (less sensitive to "
          "other processes than wall time)\n")
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print(f"\nforward logits max |mcore - HF| = {tp1['forward_max_abs_diff']:.3g} (bf16); "
          f"mcore save round trip max |saved - source| = {tp1['save_roundtrip_max_abs_diff']:.3g}")
    if loadavg[0] > (os.cpu_count() or 1) or loadavg[1] > (os.cpu_count() or 1):
        print(f"WARNING: load average above {os.cpu_count()} CPUs: other processes competed for the CPU; "
              "compare ratios (measured interleaved), not absolute times.")
    return rows


def _pool(values: list):
    """Merge the same field of several runs: samples are concatenated, single numbers become their median
    (max for the max-difference checks)."""
    first = values[0]
    if isinstance(first, dict) and "all" in first and "median" in first:
        return stats([x for v in values for x in v["all"]])
    if isinstance(first, dict):
        return {key: _pool([v[key] for v in values]) for key in first if all(key in v for v in values)}
    if isinstance(first, list):
        return [x for v in values for x in v]
    return statistics.median(values)


def summarize(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    tp1 = _pool([run["tp1"] for run in runs])
    for key in ("forward_max_abs_diff", "save_roundtrip_max_abs_diff"):
        tp1[key] = max(run["tp1"][key] for run in runs)
    tp2 = None
    if all(run["tp2"] for run in runs):
        tp2 = [_pool([run["tp2"][rank] for run in runs]) for rank in range(2)]
        for rank in range(2):  # peaks: the worst run counts
            tp2[rank]["cold_peak"] = max(run["tp2"][rank]["cold_peak"] for run in runs)
    loads = [x for run in runs for x in run["loadavg"]]
    print(f"{len(runs)} runs pooled: {', '.join(paths)}")
    report(runs[0]["folder"], runs[0]["total_bytes"], tp1, tp2, runs[0]["threads"], (min(loads), max(loads)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small model, sanity check (< 1 minute)")
    parser.add_argument("--repeats", type=int, default=5, help="timed loads per kind (default 5)")
    parser.add_argument("--save-repeats", type=int, default=3, help="timed saves per library (default 3)")
    parser.add_argument("--forward-repeats", type=int, default=3, help="timed forwards per model (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; see README: on a shared, oversubscribed CPU every "
                             "parallel op waits for descheduled OpenMP workers)")
    parser.add_argument("--no-tp2", action="store_true", help="skip the torchrun tp=2 part")
    parser.add_argument("--save-dir", default=ROOT,
                        help=f"where saves are written (default {ROOT}; /dev/shm takes the disk out of the timing)")
    parser.add_argument("--checkpoint", help="use this checkpoint folder instead of the generated one")
    parser.add_argument("--json", help="also write all raw numbers to this file")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print one table from the samples of several --json runs pooled together, and exit")
    parser.add_argument("--tp2-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.summarize:
        summarize(args.summarize)
        return
    SAVE_DIR[0] = args.save_dir
    os.makedirs(args.save_dir, exist_ok=True)
    torch.set_num_threads(args.threads)
    folder = args.checkpoint or make_checkpoint(args.small)
    if args.tp2_worker:
        tp2_worker(folder, args.tp2_worker, args.repeats, args.save_repeats, args.forward_repeats)
        return
    quiet_libraries()
    total = checkpoint_bytes(folder)
    load_start = os.getloadavg()[0]
    tp1 = run_tp1(folder, args.repeats, args.save_repeats, args.forward_repeats)
    tp2 = None if args.no_tp2 else run_tp2(folder, args)
    loadavg = (load_start, os.getloadavg()[0])
    rows = report(folder, total, tp1, tp2, args.threads, loadavg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"folder": folder, "total_bytes": total, "threads": args.threads, "tp1": tp1, "tp2": tp2,
                       "rows": rows, "loadavg": loadavg}, f, indent=1)


if __name__ == "__main__":
    main()
