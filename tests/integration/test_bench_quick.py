"""bench/throughput.py --quick: the whole benchmark (HF eager, HF + torch.compile, HF + DeepSpeed
ZeRO-2, megaclm's pretrain_gpt.py with torch ops and with --kernels fused, the micro-batch search) on
tiny shapes on the CPU; bench/moe.py --quick (EP=1 vs EP=2 engines) likewise; bench/efficiency.py --quick,
the efficiency audit of every parallel layout against its budgets (issue 24)."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from megaclm.ops import _cuda

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "throughput.py"


def _load_bench(name: str, path: pathlib.Path):
    if name not in sys.modules:  # dataclasses look their module up in sys.modules
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _bench_module():
    return _load_bench("bench_throughput", SCRIPT)


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


def _efficiency_module():
    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))  # its probes module sits beside it
    return _load_bench("bench_efficiency", ROOT / "bench" / "efficiency.py")


@pytest.fixture(scope="module")
def efficiency_audit(tmp_path_factory):
    """bench/efficiency.py --quick: every layout's real training step on 2 gloo ranks, audited (issue 24)."""
    out = tmp_path_factory.mktemp("efficiency") / "audit.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    proc = subprocess.run([sys.executable, "bench/efficiency.py", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_efficiency_audit_is_within_its_budgets(efficiency_audit):
    proc, data = efficiency_audit
    assert proc.returncode == 0 and data["over_budget"] == [], proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["layout"]: r for r in data["rows"]}
    assert set(rows) == set(_efficiency_module().LAYOUTS)
    for name in rows:
        assert f"\n{name} " in proc.stdout  # one table row per layout
    sp = rows["tp2-sp"]
    # The SP column-parallel linears keep their local (B, T/2, H) input: 1/tp of tp1's bytes, within 5%.
    assert sp["act_ratio"] < 0.5 * 1.05
    # The SP-replicated gradients: one all-reduce per step, beside the vocab-parallel loss's 3 per micro-batch.
    tp_all_reduces = sum(c["calls"] for c in sp["collectives"] if c["kind"] == "all-reduce" and c["group"] == "tp")
    assert tp_all_reduces == 3 * 2 + 1, sp["collectives"]
    # Host syncs are attributed to the line that makes them, e.g. the trainer's loss (megaclm/training/step.py).
    lines = rows["tp1"]["sync_lines"]
    assert all(re.fullmatch(r"[\w/.-]+\.py:\d+", k) for k in lines), lines
    assert any(k.startswith("megaclm/training/step.py:") for k in lines), lines


def test_memory_estimate_predicts_the_measured_activations(efficiency_audit):
    """megaclm.model.flops (with the reference ops this CPU run executes) within 10% of every layout's
    measured per-layer activation bytes."""
    _, data = efficiency_audit
    for r in data["rows"]:
        assert r["act_per_layer"] == pytest.approx(r["estimate_act_per_layer"], rel=0.10), r["layout"]


def test_efficiency_guards_catch_regressions():
    """Each budget flags a row just past it (the guards CI relies on)."""
    bench = _efficiency_module()
    sh = bench.Shape(2, 64, 176, 64)
    ok = {"layout": "tp2-sp", "act_ratio": 0.5, "act_excess": 1.0, "ideal_act_ratio": 0.5, "bytes": 100,
          "analytic_bytes": 100, "calls": 10, "analytic_calls": 10, "flops_ratio": 1.0, "expected_flops_ratio": 1.0,
          "syncs": bench.SYNC_BUDGET, "sync_lines": {}}
    assert bench.budget_failures([ok], sh) == []
    for change, message in [({"act_excess": 1.06}, "activations"), ({"bytes": 111}, "collective bytes"),
                            ({"calls": 11 + bench.COLL_SLACK}, "collective calls"), ({"flops_ratio": 1.03}, "FLOPs"),
                            ({"syncs": bench.SYNC_BUDGET + 1}, "host syncs")]:
        failures = bench.budget_failures([{**ok, **change}], sh)
        assert len(failures) == 1 and message in failures[0], (change, failures)
