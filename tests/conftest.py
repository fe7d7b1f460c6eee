"""Session fixtures: the tiny checkpoints (made once), one worker launch per layout (run once, lazily,
only for the layouts the selected tests need), and the transformers oracle (one HF model per checkpoint)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_cases import LAYOUTS, ErrorRun, Run, build_checkpoints, oracle_options  # noqa: E402
from launching import Started, worker_env  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
LAUNCH_TIMEOUT_S = 300


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


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> str:
    """Every tiny checkpoint of dist_cases.CHECKPOINTS plus the damaged copies, written once."""
    root = str(tmp_path_factory.mktemp("checkpoints"))
    build_checkpoints(root)
    return root


# World sizes the selected tests need, and per world the runs they read (set at collection), so every launch can
# start at once and runs only what is read (`-k gemma` does not load every other family).
_NEEDED_WORLDS: set[int] = set()
_NEEDED_RUNS: dict[int, set[str]] = {}
_FINISHED: dict[int, Launch] = {}


def pytest_collection_finish(session):
    """After -k / -m deselection: note which launches, and which runs of them, the remaining tests read."""
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for value in params.values():
            if isinstance(value, (Run, ErrorRun)):
                world = LAYOUTS[value.layout]["world"]
                _NEEDED_WORLDS.add(world)
                _NEEDED_RUNS.setdefault(world, set()).add(value.id)


@pytest.fixture(scope="session")
def launches(checkpoint_root, tmp_path_factory):
    """`launches(layout)`: the finished worker launch that ran `layout` (one launch per world size).

    On first use every launch the selected tests need starts in the background (the world of one
    and the 2-rank torchrun overlap on two cores); each is waited for when a test first reads it.
    """
    # HF_HOME: an empty cache, no hub id resolves by accident (and HF_HUB_OFFLINE: the offline-hub case fails fast).
    env = worker_env(HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
    started: dict[int, tuple[str, Started]] = {}
    finished = _FINISHED

    def start(world: int) -> None:
        if world not in started:
            out = str(tmp_path_factory.mktemp(f"results-world{world}"))
            # --standalone: a local rendezvous on a port the agent picks itself (no port races).
            only = ",".join(sorted(_NEEDED_RUNS.get(world, ())))  # empty: every run of the world
            started[world] = (out, Started(WORKER, [str(world), checkpoint_root, out, only], world,
                                           os.path.join(out, "worker.log"), env, standalone=True))

    def get(layout: str) -> Launch:
        world = LAYOUTS[layout]["world"]
        for needed in sorted(_NEEDED_WORLDS | {world}):
            start(needed)
        if world not in finished:
            out, process = started[world]
            returncode, log = process.wait(LAUNCH_TIMEOUT_S)
            finished[world] = Launch(world, out, returncode, process.seconds, log)
        return finished[world]

    yield get
    for _, process in started.values():  # a session cut short (-x, ^C): stop what we started
        process.stop()


@pytest.fixture(scope="session")
def hf_model():
    """`hf_model(folder, dtype)`: the transformers model of a checkpoint (cached), the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(folder: str, dtype: str = "float32"):
        key = (folder, dtype)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **oracle_options(folder))
            cache[key] = model.eval()
        return cache[key]

    return get


def pytest_terminal_summary(terminalreporter):
    for world, launch in sorted(_FINISHED.items()):
        terminalreporter.write_line(
            f"mcore worker launch, world size {world}: {launch.seconds:.1f}s wall, exit code {launch.returncode}"
        )
