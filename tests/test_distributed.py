"""Data-parallel LoRA / QLoRA: two gloo ranks end with the single-process adapter.

Runs ``lowrank_ext.finetune.ddp_check`` under torchrun (2 processes on CPU),
which trains a tiny model for a few steps with DistributedDataParallel and
compares every rank's adapter with one process training on the same global
batches; see that module for why the tolerance is 1e-5.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lowrank_ext

# Subprocesses import the same lowrank_ext as this test session (a source
# checkout's python/ folder or an installed package).
PYTHON_ROOT = Path(lowrank_ext.__file__).resolve().parents[1]


def _torchrun_command() -> list[str]:
    # Prefer the launcher of the running interpreter's environment.
    launcher = Path(sys.executable).with_name("torchrun")
    if launcher.exists():
        return [str(launcher)]
    if shutil.which("torchrun"):
        return [shutil.which("torchrun")]
    return [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_ddp_ranks_match_single_process(method, tmp_path):
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(PYTHON_ROOT), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = _torchrun_command() + [
        "--standalone", "--nproc_per_node", "2", "-m", "lowrank_ext.finetune.ddp_check",
        "--method", method, "--output-dir", str(tmp_path), "--steps", "4"]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True,
                               timeout=180)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    result = json.loads((tmp_path / "ddp_check.json").read_text())
    assert result["world_size"] == 2
    assert result["backend"] == "gloo"
    assert result["ranks_identical"] is True
    assert result["max_abs_difference_to_single_process"] <= 1e-5
    # The check is meaningful only if training actually moved the adapter
    # by much more than the tolerance.
    assert result["max_abs_change_from_initial"] > 1e-3
    assert any("lora_A" in name for name in result["trainable_tensors"])
    assert any("lora_B" in name for name in result["trainable_tensors"])
    assert any("classifier" in name for name in result["trainable_tensors"])
    assert result["passed"] is True
