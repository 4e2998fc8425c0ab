"""bench/long_context.py on two GPUs (nccl, bf16): Ulysses and ring attention run, and each rank's activations
fall to about half of the unsplit model's. Skipped without two CUDA devices."""
import importlib.util
import pathlib
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "bench" / "long_context.py"


def test_bench_splits_activations_on_gpus():
    spec = importlib.util.spec_from_file_location("bench_long_context", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_long_context"] = bench
    spec.loader.exec_module(bench)
    results = bench.main(["--quick"])
    for split, base in (("ulysses N=2", "N=1 sdpa"), ("ring N=2", "N=1 unfused")):
        for mine, whole in zip(results[split], results[base]):
            assert mine["tokens_per_s"] > 0 and mine["peak"] > 0
            assert mine["act"] < 0.6 * whole["act"], (split, mine, whole)
