"""bench/throughput.py --quick: the whole benchmark (HF eager, HF + torch.compile, HF + DeepSpeed
ZeRO-2, megaclm's pretrain_gpt.py with torch ops and with --kernels fused, the micro-batch search) on
tiny shapes on the CPU; bench/moe.py --quick (EP=1 vs EP=2 engines) likewise."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from megaclm.ops import _cuda

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "throughput.py"


def _bench_module():
    if "bench_throughput" not in sys.modules:  # dataclasses look their module up in sys.modules
        spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
        sys.modules["bench_throughput"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_throughput"])
    return sys.modules["bench_throughput"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    # Exactly as the README runs it (`python bench/throughput.py --quick`, from the checkout): bench/ is
    # then first on sys.path, where a file named like an installed package once broke transformers' import.
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--quick", "--cases", "llama-tiny", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_measures_every_mode(quick_run):
    result, stdout = quick_run
    rows = {r["mode"]: r for r in result["results"] if r["case"] == "llama-tiny"}
    assert set(rows) == {"hf-eager", "hf-compile", "hf-deepspeed", "megaclm", "megaclm-fused"}
    assert [(m["case"], m["mode"]) for m in result["measured"]] == [("llama-tiny", r["mode"]) for r in result["results"]]
    ours, fused = rows["megaclm"]["tokens_per_sec"], rows["megaclm-fused"]["tokens_per_sec"]
    for mode, row in rows.items():
        assert row["tokens_per_sec"] > 0 and row["seconds"] > 0
        assert row["megaclm_ratio"] == pytest.approx(ours / row["tokens_per_sec"])
        assert row["megaclm_fused_ratio"] == pytest.approx(fused / row["tokens_per_sec"])
        assert row["mfu"] is None and row["peak_memory_gb"] is None  # CPU: no peak FLOP/s, no device memory
        assert f"  {mode}" in stdout
    # TFLOP/s is tokens/s times the model's FLOPs per token (6N + 12 L d T).
    bench = _bench_module()
    case = bench.QUICK_CASES["llama-tiny"]
    fpt = bench.flops_per_token(case.model(), case.vocab_size, case.seq_length)
    assert rows["megaclm"]["tflops"] == pytest.approx(ours * fpt / 1e12)


def test_quick_searches_the_llama_micro_batch(quick_run):
    result, _ = quick_run
    search = result["largest_micro_batch"]["llama-tiny"]
    # On the CPU nothing runs out of memory: both reach the --quick cap of 4 (megaclm in its fused mode).
    assert search == {"megaclm-fused": {"micro_batch": 4, "hit_cap": True},
                      "hf-eager": {"micro_batch": 4, "hit_cap": True}}
    # The JSON says whether megaclm-fused ran the kernels or fell back to the PyTorch ops.
    assert result["fused_kernels"] == {"available": _cuda.is_available(), "reason": _cuda.unavailable_reason()}


@pytest.mark.parametrize("limit,start,cap,expected", [
    (37, 4, 64, (37, False)), (64, 4, 64, (64, True)), (100, 4, 64, (64, True)),
    (3, 4, 64, (3, False)), (0, 4, 64, (0, False)), (1, 1, 8, (1, False)), (5, 8, 6, (5, False)),
])
def test_largest_micro_batch_search(limit, start, cap, expected):
    bench = _bench_module()
    tried = []

    def fits(mb):
        tried.append(mb)
        return mb <= limit

    assert bench.largest_micro_batch(fits, start, cap) == expected
    assert len(tried) == len(set(tried)) and all(1 <= mb <= cap for mb in tried)


def test_hf_baselines_have_megaclm_shapes():
    """The HF models the baselines train have exactly the parameters megaclm's flops.py counts
    for the same shape (unpadded vocabulary), for both families."""
    bench = _bench_module()
    for case in bench.QUICK_CASES.values():
        cfg = case.model()
        model = bench.hf_model(cfg, case.vocab_size)
        assert sum(p.numel() for p in model.parameters()) == bench.count_parameters(cfg, case.vocab_size).total


def test_bad_flags_are_one_line_errors():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--modes", "hf-eager,nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --modes: unknown mode 'nope'")


@pytest.mark.parametrize("args,message", [
    (["--only", "rms_norm,nope"], "--only nope: unknown; cases are add_layer_norm"),
    (["--impls", "fused,triton"], "--impls 'fused,triton': use a comma-separated subset of fused,eager,compile"),
])
def test_kernel_bench_bad_flags_are_one_line_errors(args, message):
    proc = subprocess.run([sys.executable, "bench/kernel_bench.py", "--quick", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


def test_moe_bench_measures_what_the_memory_estimate_says():
    """bench/moe.py --quick: real ZeRO-1 engines at EP=1 and EP=2 on 2 ranks hold the bytes the estimate gives."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    proc = subprocess.run([sys.executable, "bench/moe.py", "--quick", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    for ranks in data["cases"].values():
        for r in ranks:
            assert r["weights"] + r["optimizer"] == pytest.approx(r["estimate"], rel=0.01), r
            assert r["tokens_per_s"] > 0
    # EP=2 holds half the experts; ZeRO-1 over dp 2 already split their optimizer states (now over the 1 rank
    # holding each half), so only the weights shrink.
    assert data["ratios"]["weights"] < 0.8 and data["ratios"]["optimizer"] == pytest.approx(1.0, abs=0.01)
    assert "EP=2 / EP=1: weights" in proc.stdout
