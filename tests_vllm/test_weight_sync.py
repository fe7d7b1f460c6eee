"""update_weights into running vLLM engines after real MCoreTrainer steps at tp=2: vLLM's greedy tokens equal the
mcore model's generate after every update, through each transport (a group with the engine's own worker process,
an engine another process drives, a worker in this process); refusals leave the engine's weights as they were;
LoRA adapters go in through update_adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import folders  # noqa: E402
from conftest import worker_env  # noqa: E402

pytestmark = pytest.mark.vllm
WORKER = os.path.join(HERE, "sync_worker.py")
TIMEOUT_S = 900


def _torchrun(args: list, env: dict, log: str, world: int = 2) -> None:
    command = [sys.executable, WORKER] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", WORKER]
    with open(log, "w") as out:
        subprocess.run(command + args, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S)


def _read(path: str, log: str) -> dict:
    if not os.path.exists(path):
        pytest.fail(f"no record at {path}; log tail:\n{open(log, errors='replace').read()[-5000:]}")
    record = json.load(open(path))
    if record.get("crashed"):
        pytest.fail(record["crashed"])
    return record


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def group_run(saved, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sync-group")
    env = worker_env(OTHER_MODEL=saved["qwen3_moe-ep2"])
    _torchrun(["group", folders.DEMO, str(work / "out.json")], env, str(work / "log"))
    return _read(str(work / "out.json"), str(work / "log"))


def test_rl_loop_vllm_generates_what_the_trained_model_generates(group_run):
    assert len(group_run["rounds"]) == 2
    first, second = group_run["rounds"]
    for entry in group_run["rounds"]:
        assert entry["vllm"] == entry["mcore"]
        report = entry["report"]
        assert report["transport"] == "group" and report["buckets"] == 2  # 7.5 MiB in 4 MiB buckets
        assert report["engine"]["bytes"] == report["bytes"] > 0
    assert first["mcore"] != second["mcore"]  # the second step changed the weights, and vLLM followed


@pytest.mark.parametrize("case,words", [
    ("other-model", ["another model", "hidden_size=128 (update: 192)"]),
    ("engine-on-rank-1", ["global rank 0 only", "[0, 1]"]),
    ("small-bucket", ["bucket_bytes", "larger bucket_bytes"]),
])
def test_refusals_say_why_and_leave_the_engine_as_it_was(group_run, case, words):
    error = group_run["errors"][case]
    assert error["type"] == "WeightSyncError"
    for word in words:
        assert word in error["message"], error["message"]
    assert group_run["kept"]  # after all three, the engine generates what it did before


def test_lora_adapter_reaches_the_engine(group_run):
    adapter = group_run["adapter"]
    assert adapter["vllm"] == adapter["mcore"] and adapter["mcore"] != group_run["rounds"][-1]["mcore"]


def test_engine_driven_by_another_process(tmp_path):
    port = _free_port()
    env = worker_env()
    host_out, log = tmp_path / "host.json", tmp_path / "host.log"
    with open(log, "w") as out:
        host = subprocess.Popen([sys.executable, os.path.join(HERE, "remote_host.py"), folders.DEMO, str(port),
                                 str(host_out)], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _torchrun(["remote", folders.DEMO, str(tmp_path / "out.json"), str(port)], env, str(tmp_path / "log"))
            host.wait(timeout=300)
        finally:
            if host.poll() is None:
                host.kill()
    trainer = _read(str(tmp_path / "out.json"), str(tmp_path / "log"))
    served = _read(str(host_out), str(log))
    assert len(trainer["rounds"]) == len(served["rounds"]) == 2
    for ours, theirs in zip(trainer["rounds"], served["rounds"]):
        assert theirs["vllm"] == ours["mcore"]
        assert theirs["reports"][0]["bytes"] == ours["report"]["bytes"]


def test_worker_in_this_process_takes_tensors_by_reference(tmp_path):
    env = worker_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    _torchrun(["direct", folders.DEMO, str(tmp_path / "out.json")], env, str(tmp_path / "log"), world=1)
    record = _read(str(tmp_path / "out.json"), str(tmp_path / "log"))
    for entry in record["rounds"]:
        assert entry["report"]["transport"] == "direct" and entry["vllm"] == entry["mcore"]


def test_rl_example_runs_its_loop(tmp_path):
    """examples/rl_weight_sync.py: vLLM samples, MCoreTrainer trains on the selected completions, the engine syncs."""
    example = os.path.join(os.path.dirname(HERE), "examples", "rl_weight_sync.py")
    proc = subprocess.run([sys.executable, example, "--iterations", "2"], env=worker_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("mean reward") == 2 and proc.stdout.count("synced 7.5 MiB") == 2, proc.stdout
