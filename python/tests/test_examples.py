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


HF_EXAMPLE = EXAMPLE.parent / "hf_quickstart.py"
MODEL = pathlib.Path(__file__).resolve().parents[2] / ".cache/model/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_hf_quickstart_runs():
    import importlib.util

    import pytest

    missing = [m for m in ("torch", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the Hugging Face example needs {', '.join(missing)} (pip install {' '.join(missing)})")
    if not MODEL.is_file():
        pytest.skip(f"model {MODEL} not found: run scripts/fetch-model")
    r = subprocess.run([sys.executable, str(HF_EXAMPLE)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "kvc.hf.Cache('snapkv(ratio=0.5)+kivi(bits=2)', layers=30" in r.stdout
    assert "tokens seen" in r.stdout and "answer:" in r.stdout
