# SPDX-License-Identifier: Apache-2.0
"""The example script runs as the README shows it."""
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_quickstart_runs():
    r = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "after compression" in r.stdout and "kvc.Error: kvc.Cache.append: k has shape" in r.stdout
