"""`--save X --load X --pretrained-checkpoint HF_DIR` under the real `deepspeed --num_gpus 2` launcher: one command
for the first launch and every restart (megaclm.training.start). A tiny random Llama (tools/checkpoint/tiny_hf_model.py)
on Wikipedia summaries tokenized with its own tokenizer:

  reference  --pretrained-checkpoint I, I the same model imported beforehand (convert_hf.py import): the
             megaclm-checkpoint form; its YAML says `finetune: true`, turned off by --no-finetune
  killed     --pretrained-checkpoint HF_DIR (imported on the fly), kill -9 of the whole launcher while it
             writes its third checkpoint; relaunched with the same command: it resumes from the second,
             leaves the first two untouched, and every loss equals the reference's bit for bit
Plus, without a launcher (they stop before any process starts): a fresh run into a --save that holds
another run's checkpoints is refused in one line, and --overwrite-save lets it through; a model of other shapes
than the --pretrained-checkpoint's is refused.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megaclm.checkpoint.hf.importer import import_hf, model_config_yaml
from megaclm.checkpoint.layout import read_latest
from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.tokenizer import build_tokenizer
from test_pretrain import REPO, free_port, train_losses, with_tests_on_path


BIN = Path(sys.executable).parent
ITERS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The HF model, its import, the corpus and the model's --config YAML (with `finetune: true`)."""
    root = tmp_path_factory.mktemp("pretrained")
    hf = root / "hf"
    subprocess.run([sys.executable, "tools/checkpoint/tiny_hf_model.py", "--family", "llama", "--out", str(hf)],
                   cwd=REPO, check=True, capture_output=True)
    import_hf(str(hf), str(root / "import"))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(hf))
    docs = [json.loads(line)["text"] for line in open(REPO / "tests/data/wiki_summaries_500.jsonl")]
    builder = IndexedDatasetBuilder(str(root / "text_document"), np.uint16)
    for ids in tok.tokenize_batch(docs):
        builder.add_document(np.array(ids + [tok.eod]))
    builder.finalize()
    config = root / "model.yaml"
    config.write_text(model_config_yaml(str(hf)) + "checkpoint:\n  finetune: true\n")
    return root


def command(root: Path, save: Path, pretrained: Path, *extra: str) -> list[str]:
    return ["pretrain_gpt.py", "--config", str(root / "model.yaml"), "--no-finetune",
            "--data-path", str(root / "text_document"), "--split", "98,2,0", "--num-workers", "0",
            "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--zero-stage", "1", "--save-interval", "2",
            "--eval-interval", "100", "--eval-iters", "1", "--log-interval", "1",
            "--save", str(save), "--load", str(save), "--pretrained-checkpoint", str(pretrained), *extra]


def launch(argv: list[str], log: Path) -> subprocess.Popen:
    """The deepspeed launcher in its own session (so that kill -9 reaches every process)."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(with_tests_on_path(os.environ), OMP_NUM_THREADS="1"),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(argv: list[str], log: Path) -> str:
    proc = launch(argv, log)
    assert proc.wait(300) == 0, log.read_text()[-4000:]
    return log.read_text()


def digests(ckpt: Path) -> dict[str, str]:
    return {str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ckpt.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(setup):
    save = setup / "reference"
    text = finish(command(setup, save, setup / "import"), setup / "reference.log")
    return save, text


@pytest.fixture(scope="module")
def killed(setup):
    """(save dir, the first launch's log, the relaunch's log, the first two checkpoints' digests at the kill)."""
    save, argv = setup / "run", command(setup, setup / "run", setup / "hf")
    first = launch([*argv, "--callbacks", "faults:save_pause=3"], setup / "killed.log")
    end = time.time() + 240
    # iteration 6's save is being written (held open by faults:save_pause); `latest` still names iteration 4
    while not ((save / "iter_0000006").is_dir() and read_latest(str(save)) == "iter_0000004"):
        assert first.poll() is None and time.time() < end, (setup / "killed.log").read_text()[-4000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = {tag: digests(save / tag) for tag in ("iter_0000002", "iter_0000004")}
    losses = train_losses(save)
    text = finish(argv, setup / "relaunch.log")
    return save, (setup / "killed.log").read_text(), text, before, losses


def test_the_megaclm_checkpoint_form_initialises_at_iteration_0(reference, setup):
    save, text = reference
    assert f"initialising the weights from --pretrained-checkpoint {setup / 'import'}" in text
    assert sorted(train_losses(save)) == list(range(1, ITERS + 1))
    stored = json.loads((save / f"iter_{ITERS:07d}/megaclm/config.json").read_text())["checkpoint"]
    assert stored["finetune"] is False  # the YAML's `finetune: true`, turned off by --no-finetune


def test_a_killed_continual_pretraining_run_resumes_with_the_same_command(killed, reference):
    save, first, again, before, losses = killed
    assert "imported llama" in first and "initialising the weights from --pretrained-checkpoint" in first
    assert "holds iter_0000004: resuming from it; --pretrained-checkpoint" in again
    assert "imported llama" not in again and not (save / ".pretrained-import").exists()
    assert {tag: digests(save / tag) for tag in before} == before  # never overwritten
    ref = train_losses(reference[0])
    assert {i: losses[i] for i in range(1, 5)} == {i: ref[i] for i in range(1, 5)}  # HF on the fly == its import
    resumed = train_losses(save)  # the relaunch's rows for iterations 5.. replace the killed run's
    assert resumed == ref, (resumed, ref)
    assert read_latest(str(save)) == f"iter_{ITERS:07d}"


def test_a_fresh_run_into_another_runs_save_is_refused(reference, setup, tmp_path):
    save = reference[0]
    argv = [sys.executable, *command(setup, save, setup / "hf")]
    argv[argv.index("--load") + 1] = str(tmp_path / "empty")  # nothing to resume: a fresh run
    refused = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and errors == [
        f"error: --save {save} already holds checkpoints of another run (newest iter_{ITERS:07d}) and this run "
        f"starts at iteration 0: its saves would overwrite them; resume that run with --load {save}, pass another "
        "--save, or pass --overwrite-save to reuse the directory"], refused.stderr
    allowed = subprocess.run(argv + ["--overwrite-save", "--validate-only"], cwd=REPO, capture_output=True, text=True)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    other = subprocess.run(argv + ["--overwrite-save", "--num-layers", "3"], cwd=REPO, capture_output=True, text=True)
    assert other.returncode == 2 and f"error: --pretrained-checkpoint {setup / 'hf'} has num_layers=2, unlike this " \
        "run's model" in other.stderr, other.stderr[-2000:]
