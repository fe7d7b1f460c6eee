"""Helpers shared by the suites that launch worker scripts: plain `python` for a world of one, torchrun
for more ranks, in a clean environment, with a timeout, the output captured in a log file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

import pytest

# What a launcher sets for its ranks; a worker started from inside another launch must not inherit it.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for torchrun's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(**overrides: str) -> dict:
    """os.environ without the launcher's variables; quiet, one thread per rank, offline (plus `overrides`)."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",  # two ranks share two cores
        HF_HUB_OFFLINE="1",  # nothing goes online
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(overrides)
    return env


def worker_command(worker: str, args: list[str], world: int, standalone: bool = False) -> list[str]:
    """`python worker *args` for a world of one, else torchrun with `world` ranks on this host.

    The rendezvous is at 127.0.0.1 on a free port, or with `standalone` torchrun's own local one (a port
    the agent picks itself)."""
    if world == 1:
        return [sys.executable, worker, *args]
    if standalone:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={world}", worker, *args]


class Started:
    """A worker launch running in the background (its own process group), its output going to `log_path`.

    Several can run at once; `wait(timeout_s)` counts the timeout from the start."""

    def __init__(self, worker: str, args: list[str], world: int, log_path: str, env: Optional[dict] = None,
                 standalone: bool = False):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.start = time.time()
        self.seconds = 0.0
        self.proc = subprocess.Popen(worker_command(worker, args, world, standalone), env=env or worker_env(),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """Kill torchrun and its ranks (the session we started) if still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout_s: float) -> tuple[Optional[int], str]:
        """(exit code, or None if killed at the timeout; the log, ending with a line that says which)."""
        try:
            returncode: Optional[int] = self.proc.wait(timeout=max(1.0, timeout_s - (time.time() - self.start)))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # on the timeout, and on an interrupt while waiting
            self.stop()
            self._log.close()
        self.seconds = time.time() - self.start
        with open(self.log_path, errors="replace") as f:
            log = f.read()
        if returncode is None:
            log += f"\n[killed: still running after {timeout_s}s; whole log: {self.log_path}]"
        else:
            log += f"\n[exit {returncode} after {self.seconds:.0f}s; whole log: {self.log_path}]"
        return returncode, log


def launch_together(worker: str, launches: dict[str, tuple[list[str], int]], out: str,
                    timeout_s: float) -> dict[str, tuple[Optional[int], str]]:
    """Start every `name: (args, world)` launch of `worker` at once (logs OUT/<name>.log), wait for all:
    {name: (exit code or None on the timeout, log)}. An interrupt while waiting stops them all."""
    started = {name: Started(worker, args, world, os.path.join(out, f"{name}.log")) for name, (args, world) in launches.items()}
    try:
        return {name: process.wait(timeout_s) for name, process in started.items()}
    finally:
        for process in started.values():
            process.stop()


def launch(worker: str, args: list[str], world: int, timeout_s: float, log_path: str,
           env: Optional[dict] = None) -> tuple[Optional[int], str]:
    """Run `worker *args` on `world` ranks and wait: (exit code or None on the timeout, log); see Started."""
    return Started(worker, args, world, log_path, env).wait(timeout_s)


def once_per_key(worker: str, inputs: str, tmp_path_factory, prefix: str, world_of: Callable[[str], int],
                 timeout_s: float) -> Callable[[str], tuple[str, str]]:
    """`get(key)` runs `worker key INPUTS OUT` on `world_of(key)` ranks the first time `key` is asked for
    (OUT a fresh folder `prefix-key`) and returns (OUT, the log's last 8000 characters) every time."""
    done: dict[str, tuple[str, str]] = {}

    def get(key: str) -> tuple[str, str]:
        if key not in done:
            out = str(tmp_path_factory.mktemp(f"{prefix}-{key}"))
            _, log = launch(worker, [key, inputs, out], world_of(key), timeout_s, os.path.join(out, "worker.log"))
            done[key] = (out, log[-8000:])
        return done[key]

    return get


def worker_record(out: str, run: str, log: str, name: str = "record.json") -> dict:
    """The JSON file `name` a worker wrote for `run` under `out`; fails the test with the run's crash
    reports (`crash*` files) and the launch log if there is none."""
    path = os.path.join(out, run, name)
    if not os.path.exists(path):
        details = ""
        folder = os.path.join(out, run)
        for crash in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if crash.startswith("crash"):
                with open(os.path.join(folder, crash)) as f:
                    details += json.load(f)["crashed"]
        pytest.fail(f"{run}: no {name}.\n{details}\nworker log:\n{log}")
    with open(path) as f:
        return json.load(f)
