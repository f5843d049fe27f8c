"""benchmarks/gpu.py (``python -m benchmarks.gpu``) in its small CPU mode, so the GPU benchmark
cannot rot where no GPU is.

Checks that every section runs and prints its figures, not the figures themselves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu", "--images", "8", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    number = r"\d+\.\d"
    for arch in ("resnet18", "squeezenet1_1"):
        for size in (32, 48):
            assert re.search(rf"{arch} +{size} px +{number}\d* +{number}\d* +{number}\d* +{number}\d* ", out), out
    assert re.search(r"ens infer: 8 images, 3 models x 6 views on CPUExecutionProvider", out), out
    assert re.search(rf"loop / model only {number}\d*x", out), out
    assert re.search(rf"3\. decoding alone, \d+ processes: {number}\d* images/s", out), out
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == [
        "mnasnet0_5-32.onnx", "resnet18-32.fp16.onnx", "resnet18-32.onnx",
        "squeezenet1_1-32.fp16.onnx", "squeezenet1_1-32.onnx"]
