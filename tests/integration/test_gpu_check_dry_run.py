"""tools/gpu_check.sh --dry-run: the whole GPU check (install the carried wheels, build, tests/gpu, the
kernel bench, the throughput bench per case, the report) runs on the CPU with tiny sizes, as a subprocess
exactly as a GPU session runs it; and its budgets, failures and bad flags behave as documented."""
import base64
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
DRY_STAGES = ["install", "build", "tests", "kernel-bench", "profile-hardware", "throughput-gpt2-tiny",
              "throughput-llama-tiny"]
KERNELS = ["rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "bias_gelu", "swiglu", "rope",
           "scaled_masked_softmax", "scaled_masked_softmax@long", "cross_entropy", "linear_cross_entropy"]


def probe_wheel(folder: pathlib.Path) -> pathlib.Path:
    """A minimal pure-Python wheel (module gpu_check_probe) standing in for the carried wheel folder."""
    folder.mkdir(parents=True, exist_ok=True)
    info = "gpu_check_probe-0.1.dist-info"
    files = {"gpu_check_probe.py": "VALUE = 1\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(text):
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},{digest(text)},{len(text)}\n" for name, text in files.items()) + f"{info}/RECORD,,\n"
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", record)
    return path


def run_check(tmp_path: pathlib.Path, *args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp"), "GPU_CHECK_SITE": str(tmp_path / "site"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    for key in ("OUT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    probe_wheel(tmp / "wheels")
    proc = run_check(tmp, "--dry-run", "--out", str(tmp / "out"), "--wheels", str(tmp / "wheels"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return tmp, json.loads((tmp / "out" / "gpu_check.json").read_text()), proc.stdout


def test_every_stage_runs_and_passes(dry_run):
    tmp, summary, _ = dry_run
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == DRY_STAGES
    assert all(s["status"] == "passed" and s["rc"] == 0 and s["seconds"] > 0 for s in summary["stages"]), stages
    assert stages["install"]["note"].startswith("1 wheel(s) installed")
    assert "CUDA build skipped (--dry-run)" in stages["build"]["note"]
    assert summary["dry_run"] is True and summary["elapsed_s"] <= summary["budget_s"]
    # The carried wheel went to the site dir, which the later stages import from; no scratch is left.
    assert (tmp / "site" / "gpu_check_probe.py").exists()
    assert summary["environment"]["versions"]["deepspeed"] and summary["environment"]["device"] == "cpu"
    assert list((tmp / "tmp").iterdir()) == []
    for name in DRY_STAGES:
        assert (tmp / "out" / "logs" / f"{name}.log").stat().st_size > 0


def test_gpu_tests_ran_and_skipped_cleanly(dry_run):
    _, summary, _ = dry_run
    tests = summary["tests"]
    assert tests["tests"] > 100 and tests["skipped"] == tests["tests"]  # no CUDA here: every GPU test skips
    assert tests["failures"] == tests["errors"] == 0 and tests["failed_tests"] == []


def test_kernel_bench_measured_every_kernel_against_compile(dry_run):
    tmp, summary, _ = dry_run
    kb = summary["kernels"]
    assert kb["impls"] == ["eager", "compile"]  # the fused kernels are not built on the CPU
    assert [(r["kernel"], r["impl"]) for r in kb["rows"]] == [(k, i) for k in KERNELS for i in ("eager", "compile")]
    rows = {(r["kernel"], r["impl"]): r for r in kb["rows"]}
    for ratio in kb["ratios"]:
        ours, other = rows[(ratio["kernel"], "eager")], rows[(ratio["kernel"], "compile")]
        assert ratio["fwd_bwd_speedup"] == pytest.approx(other["total_ms"] / ours["total_ms"])
    assert [r["kernel"] for r in kb["ratios"]] == KERNELS
    assert "fused: skipped" in (tmp / "out" / "logs" / "kernel-bench.log").read_text()


def test_hardware_profile_is_written_and_loads_in_the_planner(dry_run):
    tmp, summary, stdout = dry_run
    from megaclm.planner.hardware import load_profile

    path = tmp / "out" / "hardware_profile.json"
    profile = load_profile(str(path))  # what tools/plan_layout.py --gpu accepts
    assert "fp32" in profile.peak_tflops and profile.intra_node.gbps > 0 and profile.intra_node.latency_us > 0
    assert profile.op_overhead_us > 0  # one megaclm layer's operations, timed at a size where they cost only overhead
    assert profile.zero3_layer_us > 0 and 0 <= profile.overlap <= 1  # DeepSpeed's hooks; gloo beside a matmul
    curve = profile.intra_node.sizes["all_reduce"]
    assert len(curve) >= 2 and all(a[1] <= b[1] for a, b in zip(curve, curve[1:]))  # made non-decreasing
    measured = summary["hardware_profile"]["measured"]
    assert measured["matmul_tflops"] > 0 and measured["attention_tflops"] > 0 and measured["copy_gbps"] > 0
    assert "Hardware profile cpu (bench/profile_hardware.py" in stdout


def test_throughput_per_case_every_mode_with_ratios(dry_run):
    _, summary, _ = dry_run
    assert set(summary["throughput"]) == {"gpt2-tiny", "llama-tiny"}
    for case, result in summary["throughput"].items():
        rows = {r["mode"]: r for r in result["results"]}
        assert list(rows) == ["hf-eager", "hf-compile", "hf-deepspeed", "megaclm", "megaclm-fused"]
        for row in rows.values():
            assert row["megaclm_fused_ratio"] == pytest.approx(
                rows["megaclm-fused"]["tokens_per_sec"] / row["tokens_per_sec"])
    assert set(summary["throughput"]["llama-tiny"]["largest_micro_batch"]["llama-tiny"]) == {"megaclm-fused", "hf-eager"}
    # The targets name the GPU cases, which a dry run does not measure.
    assert [(t["case"], t["met"]) for t in summary["targets"]] == [
        ("gpt2-124m", None), ("gpt-1.3b", None), ("llama-1.2b", None)]


def test_markdown_is_printed_and_written(dry_run):
    tmp, summary, stdout = dry_run
    md = (tmp / "out" / "gpu_check.md").read_text()
    assert stdout.endswith(md)
    for stage in summary["stages"]:
        assert f"| {stage['name']} | passed | {stage['seconds']:.1f} |" in md
    assert "| llama-tiny | megaclm-fused | 2 |" in md and "| rope | compile |" in md


def test_a_failing_stage_does_not_stop_the_later_ones_and_budgets_hold(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    proc = run_check(tmp_path, "--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "wheels"),
                     "--stages", "install,kernel-bench,throughput-gpt2-tiny,tests", "--stage-budget", "kernel-bench=1",
                     "--throughput-args", "--micro-batch-size 0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    stages = {s["name"]: s for s in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]}
    assert list(stages) == ["install", "kernel-bench", "throughput-gpt2-tiny", "tests"]  # in the order asked for
    assert stages["install"]["status"] == "failed" and stages["install"]["rc"] == 1
    assert "exit status 1" in stages["install"]["note"]
    # --throughput-args reach the bench; its one-line error is the stage's note.
    assert stages["throughput-gpt2-tiny"]["status"] == "failed" and stages["throughput-gpt2-tiny"]["rc"] == 2
    assert stages["throughput-gpt2-tiny"]["note"] == "exit status 2: error: --micro-batch-size 0 must be >= 1"
    assert stages["kernel-bench"]["status"] == "timed_out" and stages["kernel-bench"]["budget_s"] == 1
    assert stages["kernel-bench"]["seconds"] < 15  # stopped (and killed) at its budget
    assert stages["tests"]["status"] == "passed"
    assert "== kernel-bench (budget 1s" in proc.stdout


def test_stages_after_the_overall_budget_are_skipped_with_a_line(tmp_path):
    (tmp_path / "out").mkdir()  # an earlier run's results in the same folder are not this run's
    (tmp_path / "out" / "kernel_bench.json").write_text('{"rows": [{"kernel": "old"}]}')
    (tmp_path / "out" / "env.json").write_text('{"device": "old"}')
    proc = run_check(tmp_path, "--dry-run", "--out", str(tmp_path / "out"), "--budget", "0", timeout=60)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [(n, "skipped") for n in DRY_STAGES]
    assert summary["kernels"] is None and summary["environment"] is None and summary["throughput"] == {}
    for name in DRY_STAGES:
        assert f"== {name}: skipped (the overall budget of 0s is spent" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--stages", "install,nope"], "--stages: unknown stage 'nope'; choose from install build tests kernel-bench "
                                   "profile-hardware"),
    (["--budget", "8min"], "--budget 8min: give whole seconds"),
    (["--stage-budget", "kernels=10"], "--stage-budget kernels=10: unknown stage 'kernels'"),
    (["--stage-budget", "tests=ten"], "--stage-budget tests=ten: give NAME=SECONDS"),
    (["--out"], "--out needs a value"),
    (["--gpu"], "unknown argument --gpu"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    proc = run_check(tmp_path, "--dry-run", *args, *([] if "--out" in args else ["--out", str(tmp_path / "out")]),
                     timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "tools" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_take_megaclms_better_mode():
    report = _report_module()

    def rows(case, **modes):  # mode -> (tokens/s, MFU)
        return {case: {"results": [{"mode": m.replace("_", "-"), "tokens_per_sec": t, "mfu": f}
                                   for m, (t, f) in modes.items()]}}

    throughput = {**rows("gpt2-124m", hf_compile=(100.0, 0.3), megaclm=(120.0, 0.36), megaclm_fused=(131.0, 0.39)),
                  **rows("gpt-1.3b", hf_eager=(10.0, 0.3), megaclm=(16.0, 0.48), megaclm_fused=(15.0, 0.45))}
    got = {t["case"]: (t["value"], t["mode"], t["met"]) for t in report.check_targets(throughput)}
    assert got["gpt2-124m"] == (pytest.approx(1.31), "megaclm-fused", True)
    assert got["gpt-1.3b"] == (0.48, "megaclm", False)
    assert got["llama-1.2b"] == (None, None, None)  # not measured


def test_wheel_folder_fits_the_carry_limit_and_installs(tmp_path):
    """tools/gpu_wheels.sh for this machine's Python (the GPU machine's is 3.12): the folder fits in
    64 MiB with the checkout, DeepSpeed has no compiled ops, and the install stage installs every wheel
    and imports DeepSpeed and pydantic from them."""
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = tmp_path / "whl"
    build = subprocess.run(["bash", str(ROOT / "tools" / "gpu_wheels.sh"), "--out", str(folder),
                            "--python-version", pyver], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"deepspeed", "pydantic", "pydantic_core", "hjson", "ninja", "py_cpuinfo", "pytest_timeout"} <= names
    deepspeed = next(folder.glob("deepspeed-*-py3-none-any.whl"))
    with zipfile.ZipFile(deepspeed) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]  # DS_BUILD_OPS=0: ops JIT-built on the GPU
    size_mib = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert size_mib < 32 and "requirements complete" in build.stdout
    assert re.search(r"wheel folder .*: \d+\.\d MiB; checkout \d+\.\d MiB; carried in all \d+\.\d MiB of 64 MiB",
                     build.stdout)
    proc = run_check(tmp_path, "--dry-run", "--stages", "install", "--out", str(tmp_path / "out"),
                     "--wheels", str(folder))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (tmp_path / "out" / "logs" / "install.log").read_text()
    assert f"{len(wheels)} wheel(s) installed" in log
    for module in ("deepspeed", "pydantic", "hjson", "pytest_timeout"):
        assert re.search(rf"^{module} [0-9.]+ from {re.escape(str(tmp_path / 'site'))}(/{module})?$", log, re.M), log


def test_help_lists_the_stages_and_flags():
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for word in ("install", "build", "tests", "kernel-bench", "throughput-CASE", "--dry-run", "--stage-budget"):
        assert word in proc.stdout
    assert "set -uo" not in proc.stdout  # the comment block only


def test_report_of_a_gpu_run(tmp_path):
    """The report on GPU-shaped results (fused kernels, MFU, device memory, a stage out of time): the
    paths a dry run cannot reach."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stages.tsv").write_text("install\tpassed\t0\t3.1\t60\t12 wheel(s)\n"
                                    "kernel-bench\ttimed_out\t124\t150.0\t150\tstopped by its 150s budget\n"
                                    "throughput-gpt2-124m\tpassed\t0\t99.5\t150\t\n")
    kernel = {"fwd_ms": 0.1, "total_ms": 0.4, "peak_mib": 64.0, "fwd_gbs": 2900.0, "bwd_gbs": 2500.0,
              "fwd_peak": 0.87, "bwd_peak": 0.75}
    (out / "kernel_bench.json").write_text(json.dumps({
        "dtype": "bf16", "peak_tbs": 3.35, "impls": ["fused", "compile"],
        "rows": [{"kernel": "rms_norm", "impl": "fused", **kernel},
                 {"kernel": "rms_norm", "impl": "compile", **kernel, "total_ms": 0.6}],
        "ratios": [{"kernel": "rms_norm", "impl": "fused", "vs": "compile", "fwd_speedup": 1.0,
                    "fwd_bwd_speedup": 1.5, "peak_memory_ratio": 1.0}]}))
    row = {"case": "gpt2-124m", "micro_batch": 16, "seq_length": 1024, "seconds": 5.0, "peak_memory_gb": 30.5}
    (out / "throughput_gpt2-124m.json").write_text(json.dumps({
        "fused_kernels": {"available": True, "reason": ""}, "largest_micro_batch": {},
        "results": [{**row, "mode": "hf-compile", "tokens_per_sec": 1.0e5, "tflops": 80.0, "mfu": 0.081,
                     "megaclm_ratio": 1.2, "megaclm_fused_ratio": 1.4},
                    {**row, "mode": "megaclm-fused", "tokens_per_sec": 1.4e5, "tflops": 112.0, "mfu": 0.113,
                     "megaclm_ratio": 0.857, "megaclm_fused_ratio": 1.0}]}))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_report.py"), "report", str(out),
                           "--budget", "480", "--elapsed", "252.6"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = (out / "gpu_check.md").read_text()
    assert "| kernel-bench | timed_out | 150.0 | 150 | stopped by its 150s budget |" in md
    assert "| rms_norm | fused | 0.100 | 2900 | 87% | 0.400 | 2500 | 75% | n/a | n/a |" in md
    assert "| rms_norm | compile | 0.100 | 2900 | 87% | 0.600 | 2500 | 75% | n/a | 1.50 |" in md
    assert "| gpt2-124m | megaclm-fused | 16 | 140,000 | 112.00 | 11.3% | 30.5 | 0.86 | 1.00 |" in md
    assert "| gpt2-124m speedup_vs_hf-compile >= 1.3 | 1.40 (megaclm-fused) | yes |" in md
    assert "ran the PyTorch ops" not in md
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["targets"][0]["met"] is True and summary["targets"][1]["met"] is None
    assert summary["environment"] is None and summary["tests"] is None  # those stages did not run
