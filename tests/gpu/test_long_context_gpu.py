"""bench/long_context.py on two GPUs (nccl, bf16), run as the README runs it: Ulysses and ring attention run,
and each rank's activations fall to about half of the unsplit model's. Skipped without two CUDA devices."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_splits_activations_on_gpus(tmp_path):
    out = tmp_path / "long_context.json"
    proc = subprocess.run([sys.executable, "bench/long_context.py", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for split, base in (("ulysses N=2", "N=1 sdpa"), ("ring N=2", "N=1 unfused")):
        for mine, whole in zip(results[split], results[base]):
            assert mine["tokens_per_s"] > 0 and mine["peak"] > 0
            assert mine["act"] < 0.6 * whole["act"], (split, mine, whole)
