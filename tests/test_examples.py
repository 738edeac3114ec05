"""Every example runs end to end (``--quick``) and shows what it claims."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lowrank_ext

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the same lowrank_ext as this test session.
PYTHON_ROOT = Path(lowrank_ext.__file__).resolve().parents[1]


def _run_example(name: str) -> str:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PYTHON_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    completed = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick"],
                               env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


def test_text_generation_learns_the_new_style():
    output = _run_example("text_generation.py")
    before = _number(r"upper-case text, before LoRA: ([\d.]+)", output)
    after = _number(r"steps: upper-case loss ([\d.]+)", output)
    plain = _number(r"held-out loss ([\d.]+)", output)
    plain_disabled = _number(r"adapter disabled: plain-text loss ([\d.]+)", output)
    assert after < 0.8 * before
    # Disabling the adapter gives back the pretrained model exactly.
    assert plain_disabled == pytest.approx(plain, abs=1e-3)
    assert "sample with adapter:" in output


def test_image_classification_adapts_conv_layers_to_rotated_digits():
    output = _run_example("image_classification.py")
    rotated_before = _number(r"rotated ([\d.]+)%", output)
    rotated_after = _number(r"rotated test accuracy ([\d.]+)%", output)
    upright_before = _number(r"upright test accuracy ([\d.]+)%", output)
    upright_disabled = _number(r"upright ([\d.]+)% \(base unchanged\)", output)
    assert rotated_after > rotated_before + 20
    assert upright_disabled == pytest.approx(upright_before, abs=0.05)


def test_peft_adapter_loads_with_the_same_outputs():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    output = _run_example("load_peft_adapter.py")
    scale = _number(r"logits up to ([\d.]+)", output)
    loaded = _number(r"load_adapter: max \|logit difference\| ([\d.e+-]+)", output)
    merged = _number(r"after \.merge\(\): max \|logit difference\| ([\d.e+-]+)", output)
    # Same fp32 math in a different order: differences at rounding level.
    assert loaded <= 1e-4 * max(scale, 1.0)
    assert merged <= 1e-4 * max(scale, 1.0)
    assert "agree on 100%" in output
