"""The tree passes pyflakes' checks (ruff's F rules, pyproject.toml): no unused import or variable, no undefined
name, no import shadowed before use."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("ballot", "serving", "pipelines", "benchmarks", "scripts", "reports", "tests")


def test_the_tree_passes_pyflakes_checks():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: it comes with the test extra (make test installs it)"
    result = subprocess.run([ruff, "check", "--no-cache", *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
