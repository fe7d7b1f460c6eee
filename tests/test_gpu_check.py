"""benchmarks/gpu_check: what can be checked without a GPU — its arguments, the wheels it carries, and the
whole run on the CPU (gloo, megatron-core's local layer spec: the path a GPU without Transformer Engine takes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
CHECKS = ["parity-tp1", "parity-tp2", "generate", "trainer-step", "lora", "speed"]


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def test_arguments():
    listed = _run("--list")
    assert listed.returncode == 0 and listed.stdout.split() == CHECKS
    assert _run("--list", "--only", "lora", "speed").stdout.split() == ["lora", "speed"]
    bad = _run("--repeats", "0")
    assert bad.returncode == 2 and "--repeats must be >= 1" in bad.stderr
    assert _run("--only", "nothing").returncode == 2


def test_wheels_for_the_gpu_image(tmp_path):
    """megatron-core, transformers and peft at the lock's versions, for CPython 3.12 on x86-64, under 64 MiB."""
    dest = tmp_path / "whl"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_wheels.sh"), str(dest)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lock = dict(line.strip().split("==") for line in open(os.path.join(ROOT, "requirements", "lock.txt"))
                if "==" in line and not line.startswith("#"))
    wheels = sorted(os.listdir(dest))
    assert len(wheels) == 3 and sum(os.path.getsize(dest / w) for w in wheels) < 64 * 2**20
    for wheel, name in zip(wheels, ("megatron_core", "peft", "transformers")):
        distribution = name.replace("_", "-")
        assert wheel.startswith(f"{name}-{lock[distribution]}-"), (wheel, lock[distribution])
        tags = wheel.removesuffix(".whl").split("-")[-3:]
        assert tags[0] in ("py3", "cp312") and re.match(r"(any|manylinux.*x86_64)", tags[2]), wheel
        with zipfile.ZipFile(dest / wheel) as archive:
            assert any(n.endswith("METADATA") for n in archive.namelist())


def test_every_check_passes_on_the_cpu(tmp_path):
    out = tmp_path / "table.md"
    proc = _run("--small", "--repeats", "1", "--new-tokens", "4", "--workdir", str(tmp_path / "work"), "--out", str(out),
                timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "layer spec: megatron-core local (no TE)" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    results = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows}
    assert len(rows) == 10 and "FAIL" not in results.values(), table
    for check in ("parity tp=1 float32", "parity tp=2 bfloat16", "generate fp32 (greedy, beams=3)",
                  "trainer 2 steps (megatron-core optimizer)", "lora forward + backward (q, v, down)"):
        assert results[check] == "PASS", table
    assert all(row.count("|") == 4 for row in rows), table  # no stray column separators in the details
