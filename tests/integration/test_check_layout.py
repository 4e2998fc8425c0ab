"""tools/check_layout.py as a user runs it (a subprocess): the README's example, a Llama-2-7B script with
TP=2 PP=2 ZeRO-1 bf16 given through the example script's LAUNCHER, passes on a shrunk model (data parallel
scaled 2 -> 1 to fit 4 ranks); the comparison fails on a perturbed loss and on perturbed weights of one family;
a layout pretrain_gpt.py would refuse is refused with its message; the other example scripts pass too (the
continual-pretraining one checks its training step and stops before the export)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaclm.checkpoint.from_deepspeed import ensure_shards
from megaclm.training.layout_check import compare

REPO = Path(__file__).resolve().parents[2]


def check_env() -> dict:
    return dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                 str(REPO / ".cache/torch_extensions")))


@pytest.fixture(scope="module")
def llama_example(tmp_path_factory):
    work = tmp_path_factory.mktemp("check") / "runs"
    launcher = f"{sys.executable} tools/check_layout.py --check-max-ranks 4 --check-dir {work} --world-size 8"
    r = subprocess.run(["bash", "examples/pretrain_llama_7b.sh", "--pipeline-model-parallel-size", "2"], cwd=REPO,
                       env=dict(check_env(), LAUNCHER=launcher), capture_output=True, text=True, timeout=900)
    return r, work


def test_readme_example_passes(llama_example):
    r, _ = llama_example
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "checking TP 2 x PP 2 x DP 1 = 4 ranks against 1 rank, 3 steps, 16-bit tolerances" in out
    assert "shrunk: dp 2 -> 1 (--max-ranks 4)" in out
    assert "32 layers, hidden 4096" in out and "-> 4 layers, hidden 64, 4 heads / 4 groups" in out
    steps = [line.split() for line in out.splitlines() if line.split()[:1] in (["loss"], ["grad_norm"], ["lr"])]
    assert sorted((s[0], int(s[1])) for s in steps) == sorted((k, i) for k in ("loss", "grad_norm", "lr")
                                                               for i in (1, 2, 3))
    families = {line[13:27].strip() for line in out.splitlines() if line.startswith("weights")}  # the step column
    assert {"attention qkv", "attention proj", "mlp fc1", "mlp fc2", "embedding", "norms", "output layer"} <= families
    assert out.rstrip().splitlines()[-1].startswith("PASS: TP 2 x PP 2 x DP 1 = 4 ranks matches")


def _perturb_loss(save: Path, iteration: int, factor: float) -> None:
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    for row in rows:
        if row.get("iteration") == iteration and "loss" in row:
            row["loss"] *= factor
    (save / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _perturb_weights(save: Path, needle: str, delta: float) -> None:
    tag = (save / "latest").read_text().strip()
    ensure_shards(str(save), tag)  # megaclm's fp32 files, made from DeepSpeed's if the comparison has not yet
    for path in (save / tag / "megaclm/model").glob("*.pt"):
        shard = torch.load(path, weights_only=False)
        for key, tensor in shard["tensors"].items():
            if needle in key:
                tensor += delta
        torch.save(shard, path)


def test_comparison_fails_on_a_wrong_loss_or_wrong_weights(llama_example, tmp_path):
    r, work = llama_example
    assert r.returncode == 0
    lr = 3e-4  # the example's
    assert compare(str(work / "reference"), str(work / "layout"), "16-bit", lr, 3).passed
    bad = tmp_path / "layout"
    shutil.copytree(work / "layout", bad)
    _perturb_loss(bad, 2, 1.05)
    _perturb_weights(bad, "mlp.fc1", 0.01)
    report = compare(str(work / "reference"), str(bad), "16-bit", lr, 3)
    failed = [(what, where) for what, where, *_, ok in report.rows if not ok]
    assert not report.passed and failed == [("loss", 2), ("weights", "mlp fc1")], failed


def test_a_layout_the_trainer_refuses_is_refused_with_its_message():
    r = subprocess.run([sys.executable, "tools/check_layout.py", "--world-size", "4", "--num-layers", "2",
                        "--hidden-size", "96", "--num-attention-heads", "3", "--tensor-model-parallel-size", "2",
                        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
                        "--global-batch-size", "4", "--train-iters", "5", "--lr", "1e-3", "--mock-data",
                        "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
                       cwd=REPO, env=check_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: model.num_attention_heads=3 is not divisible by parallel.tensor_model_parallel_size=2; "
                      "choose a tensor-parallel size that divides the number of heads"], r.stderr


@pytest.mark.parametrize("script, flags, layout", [
    ("pretrain_gpt2_125m.sh", [], "TP 1 x PP 1 x DP 2 = 2 ranks"),
    ("pretrain_gpt_1.3b.sh", ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--overlap-grad-reduce"],
     "TP 2 x PP 1 x DP 2 = 4 ranks"),
    ("pretrain_gpt2_125m.sh", ["--zero-stage", "2", "--overlap-grad-reduce"], "TP 1 x PP 1 x DP 2 = 2 ranks"),
])
def test_every_example_script_passes(script, flags, layout):
    """The other pretraining scripts, as their users launch them (8 GPUs, shrunk to 4 CPU ranks); ZeRO-1 and
    ZeRO-2 with --overlap-grad-reduce (DeepSpeed's overlap_comm) among them."""
    launcher = f"{sys.executable} tools/check_layout.py --check-max-ranks 4 --world-size 8"
    r = subprocess.run(["bash", f"examples/{script}", *flags], cwd=REPO, env=dict(check_env(), LAUNCHER=launcher),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.rstrip().splitlines()[-1].startswith(f"PASS: {layout} matches"), r.stdout[-2000:]


def test_continual_pretraining_example_checks_its_training_step(tmp_path):
    """examples/continual_pretrain_from_hf.sh under the checker: import a tiny Llama at TP=2, check step 3's
    layout, and stop there (nothing trained, nothing to export)."""
    launcher = f"{sys.executable} tools/check_layout.py --check-max-ranks 4 --world-size 2"
    r = subprocess.run(["bash", "examples/continual_pretrain_from_hf.sh"], cwd=REPO, timeout=900,
                       env=dict(check_env(), LAUNCHER=launcher, PY=sys.executable, WORK=str(tmp_path / "work")),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASS: TP 2 x PP 1 x DP 1 = 2 ranks matches" in r.stdout
    assert r.stdout.rstrip().endswith("== layout checked; no run to export (steps 4-5 skipped)")
    assert not (tmp_path / "work" / "hf").exists()
