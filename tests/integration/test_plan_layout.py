"""tools/plan_layout.py as a user runs it: the ranked table, the winner's flags (which pretrain_gpt.py parses into
the planned layout), the launch script, --check on the winner, and its one-line errors."""
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from megaclm.config import parse_args
from megaclm.utils.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "plan_layout.py"
MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--num-query-groups", "4",
         "--ffn-hidden-size", "512", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
         "--disable-bias-linear", "--max-position-embeddings", "512"]


def plan(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    proc = plan(*MODEL, "--gpus", "16", "--gpus-per-node", "8", "--gpu", "a100-80gb", "--seq-length", "512",
                "--global-batch-size", "32", "--vocab-size", "1000", "--top", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_prints_the_top_n_with_memory_time_throughput_mfu_and_bottleneck(planned):
    out, stdout = planned
    lines = stdout.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("plan: ")):]  # after DeepSpeed's log
    assert lines[0].startswith("plan: custom model (") and "on 16 x a100-80gb (8 per node), seq 512" in lines[0]
    assert "refused by megaclm's checks" in lines[1] and "over 72.0 GiB (80 GiB less 10%)" in lines[1]
    assert lines[2].split() == ["rank", "layout", "GiB/GPU", "step", "s", "tok/s/GPU", "MFU", "bottleneck"]
    rows = lines[3:7]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    plan_json = json.loads((out / "plan.json").read_text())
    ranked = plan_json["ranked"]
    assert [r["step_s"] for r in ranked] == sorted(r["step_s"] for r in ranked) and len(ranked) == 4
    for row, r in zip(rows, ranked):
        assert r["text"] in row and f"{r['memory_gib']:.1f}" in row and f"{r['mfu']:.1%}" in row
        assert r["bottleneck"] in row and sum(r["breakdown_s"].values()) == pytest.approx(r["step_s"])
        assert r["tokens_per_s_per_gpu"] == pytest.approx(32 * 512 / r["step_s"] / 16)
    assert lines[7].startswith(f"winner: {ranked[0]['text']}; flags in {out / 'winner.args'}")


def test_winner_flags_parse_into_the_planned_layout(planned):
    out, _ = planned
    best = json.loads((out / "plan.json").read_text())["ranked"][0]["layout"]
    flags = shlex.split((out / "winner.args").read_text())
    cfg, derived, _ = parse_args(flags + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
                                          "--train-iters", "1"], world_size=16)
    par, t = cfg.parallel, cfg.training
    assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, derived.data_parallel_size,
            par.seq_split_size, par.sequence_parallel) == (best["tp"], best["pp"], best["dp"], best["seq"], best["sp"])
    assert (cfg.zero.zero_stage, t.micro_batch_size, t.global_batch_size, cfg.precision.bf16) == (
        best["zero"], best["micro_batch"], 32, True)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_kv_heads, cfg.model.swiglu) == (4, 256, 4, True)
    assert (cfg.model.recompute_granularity or "none") == best["recompute"]
    assert cfg.zero.overlap_grad_reduce == best["overlap_grad"]


def test_overlap_grad_reduce_reaches_the_winner_flags():
    from megaclm.config.kernels import KernelsConfig
    from megaclm.config.model import ModelConfig
    from megaclm.planner.cost import Layout

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
    for overlap in (True, False):
        flags = _tool().winner_flags(Layout(dp=4, zero=2, overlap_grad=overlap), model, None, KernelsConfig(),
                                     KernelsConfig(), 128, 8, "bf16")
        cfg, _, _ = parse_args(flags + ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                                        "--train-iters", "1"], world_size=4)
        assert (cfg.zero.zero_stage, cfg.zero.overlap_grad_reduce) == (2, overlap)


def test_launch_script_runs_pretrain_gpt_with_the_winner(planned, tmp_path):
    out, _ = planned
    script = out / "launch.sh"
    assert os.access(script, os.X_OK) and subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # LAUNCHER=echo: the command line the script would launch, as examples/*.sh allow.
    proc = subprocess.run(["bash", str(script), "--train-iters", "5"], env={**os.environ, "LAUNCHER": "echo"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "pretrain_gpt.py" and words[-2:] == ["--train-iters", "5"]
    assert " ".join(shlex.split((out / "winner.args").read_text())) in proc.stdout


def test_check_runs_check_layout_on_the_winner(tmp_path):
    proc = plan(*MODEL, "--num-layers", "2", "--gpus", "2", "--gpu", "h100-80gb", "--seq-length", "128",
                "--global-batch-size", "4", "--vocab-size", "1000", "--precision", "fp32", "--top", "1",
                "--zero-stages", "0,1", "--recompute", "none", "--out", str(tmp_path), "--check",
                "--check-max-ranks", "2", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check: " in proc.stdout and "tools/check_layout.py --world-size 2 --check-max-ranks 2" in proc.stdout
    assert "PASS:" in proc.stdout


def _tool():
    spec = importlib.util.spec_from_file_location("plan_layout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE = MODEL + ["--gpus", "8", "--global-batch-size", "16", "--seq-length", "512", "--vocab-size", "1000",
                "--gpu", "a100-80gb"]
BIG = ["--num-layers", "64", "--hidden-size", "16384", "--ffn-hidden-size", "65536", "--num-attention-heads", "128",
       "--num-query-groups", "8"]


@pytest.mark.parametrize("args,message", [
    (["--gpu", "v100"], "--gpu v100: unknown GPU; choose one of a100-80gb, h100-80gb, h200-141gb"),
    (["--gpus", "0"], "--gpus 0 must be >= 1"),
    (["--recompute", "all"], "--recompute all: choose from none, selective, full"),
    (["--split-kinds", "zigzag"], "--split-kinds zigzag: choose ulysses, ring or both"),
    (BIG + ["--gpus", "1"], "no layout of 1 GPUs fits in 72.0 GiB (a100-80gb, 10% kept free): the smallest needs"),
    (["--global-batch-size", "3", "--gpus", "2", "--tp-sizes", "1", "--seq-splits", "1", "--pp-sizes", "1"],
     "megaclm accepts no layout of 2 GPUs for this model and batch; e.g.: training.global_batch_size=3 is not "
     "divisible by training.micro_batch_size=1 x data-parallel size 2"),
])
def test_bad_input_is_one_clear_error_and_nothing_written(tmp_path, args, message):
    with pytest.raises(UserError) as e:
        _tool().main(BASE + args + ["--out", str(tmp_path / "o")])
    assert str(e.value).startswith(message)
    assert not (tmp_path / "o").exists()


def test_bad_input_from_the_command_line_exits_2_with_one_line(tmp_path):
    proc = plan(*BASE, "--gpu", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --gpu {tmp_path / 'missing.json'}: no such file; pass a profile JSON (bench/profile_hardware.py "
        "writes one) or a shipped name"]
    proc = plan(*BASE, "--tp-sizes", "1,x")
    assert proc.returncode == 2 and "--tp-sizes: '1,x': give comma-separated whole numbers" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_memory_prediction_matches_measured_training_ranks(tmp_path):
    """Validation 1's non-timing part (bench/plan_validation.py; its timings are opt-in): 7 layouts of a small Llama
    trained on 2 gloo ranks through megaclm's own path; the planner's memory per GPU (megaclm's estimate) against
    the live tensor bytes at the optimizer step plus the activations autograd kept, within 10% each."""
    out = tmp_path / "v1.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "bench/plan_validation.py", "--profile", "h100-80gb", "--layouts",
                           "dp2-zero0,dp2-zero1,dp2-zero3,dp2-recompute,tp2-sp,ulysses2,pp2-mb1", "--layers", "2", "--hidden",
                           "128", "--ffn", "256", "--seq", "256", "--steps", "1", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dp2-zero0", "dp2-zero1", "dp2-zero3", "dp2-recompute", "tp2-sp", "ulysses2", "pp2-mb1"]
    for name, r in rows.items():
        assert r["predicted_gib"] / r["measured_gib"] == pytest.approx(1, abs=0.1), name
    # The layouts differ where the estimate says they do: TP + SP and recomputation keep less than plain DP.
    assert rows["tp2-sp"]["measured_gib"] < rows["dp2-recompute"]["measured_gib"] < rows["dp2-zero0"]["measured_gib"]


def test_published_validation_from_the_command_line(tmp_path):
    """Validation 2 and BigScience's sweep as `bench/plan_validation.py --published` prints and writes them."""
    out = tmp_path / "v2.json"
    proc = subprocess.run([sys.executable, "bench/plan_validation.py", "--published", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [len(rows) for rows in result["sets"].values()] == [11, 9]
    sweep = result["bigscience_sweep"]
    assert len(sweep["rows"]) == 20 and sum(r["measured_s"] is None for r in sweep["rows"]) == 3
    assert sweep["blocking_spearman"] >= 0.6 > sweep["spearman"]
    assert f"{sweep['blocking_spearman']:.3f} with blocking launches" in proc.stdout
    assert "| tp4 pp12 dp8 zero1 rc-full mb2 | 2048 | 110.48 | 98.9 |" in proc.stdout


def test_validation_refuses_no_timed_steps():
    spec = importlib.util.spec_from_file_location("plan_validation", ROOT / "bench" / "plan_validation.py")
    validation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validation)
    with pytest.raises(UserError, match="--steps 0: time at least 1 step per layout"):
        validation.main(["--profile", "cpu.json", "--steps", "0"])


def profile_hardware_module():
    spec = importlib.util.spec_from_file_location("profile_hardware", ROOT / "bench" / "profile_hardware.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_keeps_its_other_figures_when_zero3_cannot_be_measured(tmp_path, monkeypatch, capsys):
    """bench/profile_hardware.py on a GPU session: a failed ZeRO-3 measurement costs that figure (0, with the
    error recorded and printed), not the matmul, attention and link figures measured around it."""
    module = profile_hardware_module()

    def fails(device, iters):
        raise RuntimeError("measuring ZeRO-3's per-layer cost failed:\nTraceback ...\nValueError: no engine")

    curve = [[4096, 1e-3], [16384, 2e-3]]
    link = {"gbps": 1.0, "gather_gbps": 0.5, "latency_us": 300.0, "sizes": {"all_reduce": curve, "gather": curve}}
    monkeypatch.setattr(module, "zero3_layer_us", fails)
    monkeypatch.setattr(module, "link", lambda *a: (dict(link), 0.25))
    out = tmp_path / "cpu.json"
    assert module.main(["--out", str(out), "--iters", "1", "--hidden", "64", "--tokens", "64", "--seq", "64",
                        "--copy-mib", "1"]) == 0
    assert "ZeRO-3's per-layer cost not measured, the profile counts none (ValueError: no engine)" in \
        capsys.readouterr().err
    from megaclm.planner.hardware import load_profile

    profile = load_profile(str(out))
    assert profile.zero3_layer_us == 0.0 and profile.overlap == 0.25 and profile.op_overhead_us > 0
    assert profile.intra_node.sizes["gather"] == ((4096.0, 1e-3), (16384.0, 2e-3))
    assert json.loads(out.read_text())["measured"]["zero3_error"] == "ValueError: no engine"


def test_profile_worker_that_dies_without_reporting_ends_the_wait():
    """A measuring process that crashes (here: exits with code 3 before putting anything) is a RuntimeError naming
    the measurement and the exit code within a second or two, not a 600 s wait."""
    import multiprocessing as mp

    module = profile_hardware_module()
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(3,))
    proc.start()
    with pytest.raises(RuntimeError, match="measuring the links failed: a worker exited with code 3"):
        module._wait_for(out, [proc], "measuring the links", timeout=30)
