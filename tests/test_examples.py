"""The scripts in examples/ run end to end on a tiny budget (seconds each, one thread)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"model", "ema", "swa", "t_adema"}


def _run(script, *args):
    # PYTHONPATH: the scripts import this checkout's wavg_fused, not whichever one is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_seed_resnet18(tmp_path):
    out = tmp_path / "seed.json"
    args = ["--epochs", "1", "--train-size", "8", "--test-size", "4", "--batch-size", "4", "--image-size", "32"]
    done = _run("seed_resnet18.py", *args, "--out", str(out))
    accuracies = json.loads(out.read_text())
    assert set(accuracies) == NAMES and all(0 <= a <= 1 for a in accuracies.values())
    assert "T-ADEMAModel Evaluation:" in done.stdout
    import torch

    if not torch.cuda.is_available():  # cuda=True on a CPU machine: one clear warning, not three
        assert done.stderr.count("CUDA is not available") == 1, done.stderr


def test_digits(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "digits.json"
    _run("digits.py", "--epochs", "2", "--swa-start", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["epochs"] == [1, 2]
    assert set(result["accuracy"]) == NAMES == set(result["final"])
    assert all(len(acc) == 2 and all(0 <= a <= 1 for a in acc) for acc in result["accuracy"].values())
    assert result["accuracy"]["model"][-1] > 0.5  # it learns, even in two epochs
    assert out.with_suffix(".png").stat().st_size > 0
