"""The tree passes `ruff check` with the configuration in pyproject.toml (skipped where ruff is not installed)."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ruff():
    exe = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    return exe if os.path.exists(exe) else None


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed (requirements-dev.txt installs it)")
def test_ruff_check_passes():
    out = subprocess.run([_ruff(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
