"""Session fixtures: the tiny checkpoints (made once), one worker launch per layout (run once, lazily,
only for the layouts the selected tests need), and the transformers oracle (one HF model per checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_cases import LAYOUTS, ErrorRun, Run, build_checkpoints  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
LAUNCH_TIMEOUT_S = 300


def worker_env(hf_home: str) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONWARNINGS="ignore",
        HF_HUB_OFFLINE="1",  # the offline-hub case must fail fast, and nothing else goes online
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=hf_home,  # an empty cache: no hub id resolves by accident
        OMP_NUM_THREADS="1",  # two ranks share two cores
        TOKENIZERS_PARALLELISM="false",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@dataclass
class Launch:
    world: int
    out: str
    returncode: Optional[int]
    seconds: float
    log: str

    def describe(self) -> str:
        return (
            f"the worker launch for world size {self.world} exited with {self.returncode} after "
            f"{self.seconds:.0f}s; log tail:\n{self.log[-6000:]}"
        )

    def path(self, run_id: str, name: str) -> str:
        return os.path.join(self.out, run_id, name)

    def crash(self, run_id: str, rank: int) -> Optional[str]:
        path = self.path(run_id, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f).get("crashed")
        return None

    def record(self, run, rank: int = 0) -> dict:
        """The parity record of `run` on `rank`; fails the test with the worker's traceback if there is none."""
        import torch

        crashed = self.crash(run.id, rank)
        if crashed:
            pytest.fail(f"{run.id} raised on rank {rank} in the worker:\n{crashed}")
        path = self.path(run.id, f"rank{rank}.pt")
        if not os.path.exists(path):
            pytest.fail(f"{run.id}: no result from rank {rank}. {self.describe()}")
        return torch.load(path, weights_only=False)

    def error_record(self, error_run, rank: int = 0) -> dict:
        path = self.path(error_run.id, f"rank{rank}.json")
        if not os.path.exists(path):
            pytest.fail(f"{error_run.id}: no result from rank {rank}. {self.describe()}")
        with open(path) as f:
            record = json.load(f)
        if record.get("crashed"):
            pytest.fail(f"{error_run.id} crashed on rank {rank} before the bad input was tried:\n{record['crashed']}")
        return record


class _Started:
    """A worker process running in the background, its output going to a log file."""

    def __init__(self, world: int, root: str, out: str, env: dict):
        if world == 1:
            command = [sys.executable, WORKER, "1", root, out]
        else:
            # --standalone: a local rendezvous on a port the agent picks itself (no port races).
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                WORKER, str(world), root, out,
            ]
        self.world, self.out = world, out
        self.log_path = os.path.join(out, "worker.log")
        self._log = open(self.log_path, "w")
        self.start = time.time()
        self.proc = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> Launch:
        try:
            returncode = self.proc.wait(timeout=max(1.0, LAUNCH_TIMEOUT_S - (time.time() - self.start)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # torchrun and its ranks: the session we started
            self.proc.wait()
            returncode = None
        self._log.close()
        with open(self.log_path, errors="replace") as f:
            log = f.read()
        if returncode is None:
            log += f"\n[killed: still running after {LAUNCH_TIMEOUT_S}s]"
        return Launch(self.world, self.out, returncode, time.time() - self.start, log)


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> str:
    """Every tiny checkpoint of dist_cases.CHECKPOINTS plus the damaged copies, written once."""
    root = str(tmp_path_factory.mktemp("checkpoints"))
    build_checkpoints(root)
    return root


# World sizes the selected tests need (set at collection), so every launch can start at once.
_NEEDED_WORLDS: set[int] = set()
_FINISHED: dict[int, Launch] = {}


def pytest_collection_finish(session):
    """After -k / -m deselection: note which launches the remaining tests read."""
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for value in params.values():
            if isinstance(value, (Run, ErrorRun)):
                _NEEDED_WORLDS.add(LAYOUTS[value.layout]["world"])


@pytest.fixture(scope="session")
def launches(checkpoint_root, tmp_path_factory):
    """`launches(layout)`: the finished worker launch that ran `layout` (one launch per world size).

    On first use every launch the selected tests need starts in the background (the world of one
    and the 2-rank torchrun overlap on two cores); each is waited for when a test first reads it.
    """
    env = worker_env(str(tmp_path_factory.mktemp("hf_home")))
    started: dict[int, _Started] = {}
    finished = _FINISHED

    def start(world: int) -> None:
        if world not in started:
            out = str(tmp_path_factory.mktemp(f"results-world{world}"))
            started[world] = _Started(world, checkpoint_root, out, env)

    def get(layout: str) -> Launch:
        world = LAYOUTS[layout]["world"]
        for needed in sorted(_NEEDED_WORLDS | {world}):
            start(needed)
        if world not in finished:
            finished[world] = started[world].wait()
        return finished[world]

    yield get
    for world, process in started.items():  # a session cut short (-x, ^C): stop what we started
        if world not in finished and process.proc.poll() is None:
            os.killpg(process.proc.pid, signal.SIGKILL)
            process.proc.wait()


@pytest.fixture(scope="session")
def hf_model():
    """`hf_model(folder, dtype)`: the transformers model of a checkpoint (cached), the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(folder: str, dtype: str = "float32"):
        key = (folder, dtype)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
            cache[key] = model.eval()
        return cache[key]

    return get


def pytest_terminal_summary(terminalreporter):
    for world, launch in sorted(_FINISHED.items()):
        terminalreporter.write_line(
            f"mcore worker launch, world size {world}: {launch.seconds:.1f}s wall, exit code {launch.returncode}"
        )
