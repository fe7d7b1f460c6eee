"""TRL's GRPOTrainer generating through its in-process vLLM engine (use_vllm=True, vllm_mode="colocate").

examples/drop_in/grpo_vllm.py runs as written on the HF model (TRL's own weight sync), then with its imports swapped:
mcore_transformers.trl.GRPOTrainer, whose engine takes the weights through update_weights, at tp=1 and at tp=2 under
torchrun (rank 0's engine generates for the model). TRL seeds each engine with its process index and vLLM samples
from the process's torch generator, so the runs sample the same completions after every sync only if the engine
serves the trained weights: every logged number of every step must equal TRL's on the HF model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import folders  # noqa: E402
from conftest import worker_env  # noqa: E402

pytestmark = pytest.mark.vllm
ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, "examples", "drop_in", "grpo_vllm.py")
TIMEOUT_S = 600
SWAPS = {  # the whole change a user makes
    "from transformers import AutoModelForCausalLM": "from mcore_transformers import MCoreModelForCausalLM as AutoModelForCausalLM",
    "from trl import GRPOTrainer": "from mcore_transformers.trl import GRPOTrainer",
}
RUNS = {"hf": ({}, 1, {}), "tp1": (SWAPS, 1, {}), "tp2": (SWAPS, 2, {"MCORE_TRANSFORMERS_TP": "2"})}


def _swapped(swaps: dict, folder: str) -> str:
    lines = open(EXAMPLE).read().splitlines(keepends=True)
    changed = [swaps.get(line.rstrip("\n"), line.rstrip("\n")) + "\n" for line in lines]
    assert sum(a != b for a, b in zip(lines, changed)) == len(swaps)
    path = os.path.join(folder, os.path.basename(EXAMPLE))
    with open(path, "w") as f:
        f.writelines(changed)
    return path


@pytest.fixture(scope="module")
def grpo_logs(tmp_path_factory) -> dict:
    """Every run's logged steps. The runs go at once: each is mostly start-up (imports, the engine), one thread each."""
    started = {}
    for run, (swaps, world, layout) in RUNS.items():
        out = str(tmp_path_factory.mktemp(f"grpo-vllm-{run}"))
        script = _swapped(swaps, out)
        command = [sys.executable, script] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", script]
        log = open(os.path.join(out, "log"), "w")
        started[run] = (out, log, subprocess.Popen(command + [folders.DEMO, out], env=worker_env(PYTHONPATH=ROOT, **layout),
                                                   cwd=out, stdout=log, stderr=subprocess.STDOUT))
    codes, logs = {}, {}
    try:
        for run, (_, _, proc) in started.items():
            codes[run] = proc.wait(timeout=TIMEOUT_S)
    finally:
        for _, log, proc in started.values():
            if proc.poll() is None:
                proc.kill()
            log.close()
    for run, (out, _, _) in started.items():
        assert codes[run] == 0, f"{run} failed:\n{open(os.path.join(out, 'log'), errors='replace').read()[-6000:]}"
        with open(os.path.join(out, "logs.json")) as f:
            logs[run] = json.load(f)
    return logs


@pytest.mark.parametrize("run", ["tp1", "tp2"])
def test_grpo_generating_with_vllm_matches_trl_on_transformers(grpo_logs, run):
    """Loss, reward, KL, completion length and grad norm of each of three steps (two weight syncs in between)."""
    expected, ours = grpo_logs["hf"], grpo_logs[run]
    assert len(ours) == len(expected) == 3 and [sorted(step) for step in ours] == [sorted(step) for step in expected]
    for got, want in zip(ours, expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, got, want)


@pytest.mark.parametrize("setting,words", [
    (dict(vllm_mode="server"), ["server mode", "RemoteEngine"]),
    (dict(vllm_tensor_parallel_size=2), ["vllm_tensor_parallel_size=2", "global rank 0"]),
])
def test_settings_our_sync_cannot_serve_are_refused_with_the_reason(setting, words):
    """Checked before TRL starts an engine or connects to a server."""
    from mcore_transformers.training import TrainingError
    from mcore_transformers.trl import GRPOConfig, _check_vllm_mode

    config = GRPOConfig(output_dir="unused", use_vllm=True, use_cpu=True, report_to=[], **setting)
    with pytest.raises(TrainingError) as refused:
        _check_vllm_mode(config)
    for word in words:
        assert word in str(refused.value)
