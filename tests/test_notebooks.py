"""Every notebook in examples/notebooks runs top to bottom (code cells in order, one fresh process each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "examples" / "notebooks").glob("*.ipynb"))


def notebook_source(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize(
    "notebook", [pytest.param(p, marks=pytest.mark.compat) if p.stem == "quickstart" else p for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS],
)
def test_notebook_runs(notebook, tmp_path):
    script = tmp_path / f"{notebook.stem}.py"
    script.write_text(notebook_source(notebook))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, f"{notebook.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
