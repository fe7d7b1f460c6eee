"""Starting the ranks of a command: join torchrun's world, or spawn local processes over a file store."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence


def under_launcher() -> bool:
    """True when torchrun (or another launcher) already started this process as one rank of a world."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_rank0() -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def say(*args, **kwargs) -> None:
    """print on global rank 0 only, flushed (workers share the terminal)."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


STORE_ENV = "MCORE_TRANSFORMERS_STORE"  # a FileStore path: how spawned ranks find each other (no port needed)
SCRATCH_ENV = "MCORE_TRANSFORMERS_SCRATCH"  # a folder the spawning process removes after every rank exited
STARTED_ENV = "MCORE_TRANSFORMERS_STARTED"  # time.time() when the command started, for the ranks' timings


def join_spawned_world() -> None:
    """In a process started by `run_distributed`: join the world over the parent's file store."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() or STORE_ENV not in os.environ:
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.FileStore(os.environ[STORE_ENV], world), rank=rank, world_size=world)


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spawn_ranks(argv: Sequence[str], nproc: int, extra_env: Optional[dict] = None) -> int:
    """Start `python -m mcore_transformers.tools.cli ARGV` as ranks 0..nproc-1 of one local world and wait.

    The ranks share a file store (no port to pick); on CPU the cores are split between them
    (OMP_NUM_THREADS, unless set). If a rank fails, the others are stopped and its exit code returned.
    """
    tmp = tempfile.mkdtemp(prefix="mcore-transformers-")
    env = dict(os.environ, **(extra_env or {}))
    env[STORE_ENV] = os.path.join(tmp, "store")
    env[SCRATCH_ENV] = tmp
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    processes: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                            LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
            processes.append(subprocess.Popen([sys.executable, "-m", "mcore_transformers.tools.cli", *argv], env=rank_env))
        while True:
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                _stop(processes)
                return failed[0] if failed[0] > 0 else 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(processes)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_distributed(command: Callable[[argparse.Namespace], int], args: argparse.Namespace, nproc: int,
                    argv: Sequence[str], extra_env: Optional[dict] = None) -> int:
    """Run `command(args)` on `nproc` ranks: in this process when it already is a rank (torchrun, or
    spawned by us) or nproc is 1; otherwise start `nproc` local processes running the same command line.
    Returns the exit code (0 = success)."""
    if not under_launcher() and nproc > 1:
        return spawn_ranks(argv, nproc, extra_env)
    if under_launcher() and STORE_ENV not in os.environ and int(os.environ["WORLD_SIZE"]) != nproc:
        say(f"note: using the {os.environ['WORLD_SIZE']} processes the launcher started (not --nproc {nproc}).")
    join_spawned_world()
    return command(args)


def quiet_libraries() -> None:
    """Keep the terminal readable: no progress bars or advisory warnings from transformers / megatron."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("megatron").setLevel(logging.ERROR)
