"""`--train-epochs` and the visible data curriculum, as a user runs them: `python pretrain_gpt.py` on one
process (no launcher), a tiny GPT on two datasets cut to exact sizes, blended by a two-phase
--data-mixing-schedule.

  A: 64 x 40 + 1 tokens -> 40 samples of 64 per pass, B: 64 x 24 + 1 -> 24; one epoch = 64 samples
  --train-epochs 2 at global batch 8: 2 x 64 / 8 = 16 iterations, the last metrics row at epoch 2.0
  --data-mixing-schedule 0:0.75,0.25 3072:0.25,0.75: phase 1 from the step after 3072 tokens = 6 steps of
  8 x 64, i.e. metrics rows 1-6 in phase 0 and 7-16 in phase 1; one console line at the start, one at 7

Runs: uninterrupted; stopped at iteration 5 (--exit-interval, status 76) and relaunched without it: it
ends at 16 too, with the uninterrupted run's losses bit for bit. Plus the one-line error for
--train-epochs with --train-iters.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.tokenizer import build_tokenizer
from megaclm.utils import exitcodes


REPO = Path(__file__).resolve().parents[2]
SP_MODEL = str(REPO / "tests/data/sp_test_model.model")
SEQ, GBS = 64, 8
SAMPLES = {"a": 40, "b": 24}  # per pass over each dataset
ITERS = 2 * sum(SAMPLES.values()) // GBS  # 16
PHASE_1 = 6 * GBS * SEQ  # tokens: phase 1 starts at step 6 (iteration 7)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> list[str]:
    """Wikipedia summaries, SentencePiece, cut into documents of 150 tokens (eod last) totalling exactly
    64 x samples + 1 tokens per dataset."""
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    texts = [json.loads(line)["text"] for line in open(REPO / "tests/data/wiki_summaries_500.jsonl")][:120]
    stream = np.concatenate([np.array(ids + [tok.eod]) for ids in tok.tokenize_batch(texts)])
    root, prefixes, used = tmp_path_factory.mktemp("epochs"), [], 0
    for name, samples in SAMPLES.items():
        tokens = stream[used:used + SEQ * samples + 1]
        used += len(tokens)
        prefix = str(root / name)
        builder = IndexedDatasetBuilder(prefix, np.uint16)
        for start in range(0, len(tokens), 150):
            builder.add_document(tokens[start:start + 150])
        builder.finalize()
        prefixes.append(prefix)
    return prefixes


def command(datasets: list[str], save: Path, *extra: str) -> list[str]:
    return [sys.executable, "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--micro-batch-size", "4",
            "--global-batch-size", str(GBS), "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL,
            "--data-path", *datasets, "--split", "100,0,0", "--num-workers", "0", "--eval-iters", "0",
            "--data-mixing-schedule", "0:0.75,0.25", f"{PHASE_1}:0.25,0.75", "--log-interval", "1",
            "--save", str(save), "--load", str(save), "--train-epochs", "2", *extra]


def launch(argv: list[str], rc: int = exitcodes.FINISHED) -> str:
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == rc, (r.stdout + r.stderr)[-5000:]
    return r.stdout + r.stderr


def rows(save: Path) -> dict[int, dict]:
    """The training rows of metrics.jsonl by iteration (a resumed run's rows after the stopped run's)."""
    return {r["iteration"]: r for r in map(json.loads, open(save / "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="module")
def full(datasets, tmp_path_factory):
    save = tmp_path_factory.mktemp("full") / "ckpt"
    return save, launch(command(datasets, save))


@pytest.fixture(scope="module")
def resumed(datasets, tmp_path_factory):
    save = tmp_path_factory.mktemp("resumed") / "ckpt"
    first = launch(command(datasets, save, "--exit-interval", "5"), rc=exitcodes.STOPPED)
    return save, first, launch(command(datasets, save))


def test_two_epochs_train_exactly_two_passes(full, datasets):
    save, log = full
    r = rows(save)
    assert sorted(r) == list(range(1, ITERS + 1))
    assert r[ITERS]["epoch"] == 2.0 and r[ITERS]["consumed_samples"] == 2 * sum(SAMPLES.values())
    assert [r[i]["epoch"] for i in (1, 8)] == [GBS / 64, 8 * GBS / 64]
    assert f"epoch 2.000 | loss" in log and f"iter {ITERS:>7d} |" in log and f"iter {ITERS + 1:>7d} |" not in log
    # The start-up summary: per-dataset passes that add up to the 128 samples trained.
    m = re.search(r"data: 2 datasets, 64 samples per epoch; the run trains 128 samples = 2\.000 epochs: "
                  r"(\d+\.\d\d) passes over (\S+) \(40 samples per pass\), (\d+\.\d\d) over (\S+) \(24\)", log)
    assert m and [m[2], m[4]] == datasets, log[-3000:]
    assert abs(float(m[1]) * 40 + float(m[3]) * 24 - 128) < 0.02
    assert float(m[3]) > 2.5 > 1.5 > float(m[1])  # the schedule favours B in the longer phase


def test_mixing_phases_are_visible(full, datasets):
    save, log = full
    r = rows(save)
    assert [r[i]["phase"] for i in range(1, ITERS + 1)] == [0] * 6 + [1] * 10
    assert all(r[i]["blend_weights"] == [0.75, 0.25] for i in range(1, 7))
    assert all(r[i]["blend_weights"] == [0.25, 0.75] for i in range(7, ITERS + 1))
    assert {r[i]["seq_length"] for i in r} == {SEQ}
    phase_lines = [line for line in log.splitlines() if "data phase" in line]
    a, b = datasets
    assert len(phase_lines) == 2, phase_lines
    assert phase_lines[0].endswith(f"data phase 0 of 2 from iteration 1 (tokens 0+): blend weights 0.750 {a}, "
                                   f"0.250 {b}; seq length {SEQ}")
    assert phase_lines[1].endswith(f"data phase 1 of 2 from iteration 7 (tokens {PHASE_1}+): blend weights 0.250 {a}, "
                                   f"0.750 {b}; seq length {SEQ}")


def test_stopped_and_relaunched_ends_at_the_same_iteration_bit_identical(full, resumed):
    save, first, second = resumed
    assert "stopped at iteration 5" in first
    r, reference = rows(save), rows(full[0])
    assert sorted(r) == list(range(1, ITERS + 1))
    assert {i: r[i]["loss"] for i in r} == {i: reference[i]["loss"] for i in reference}
    assert r[ITERS]["epoch"] == 2.0
    # The relaunch announces the phase it resumes in, then the change.
    assert [line.split("data phase ")[1][:28] for line in second.splitlines() if "data phase" in line] == [
        "0 of 2 from iteration 6 (tok", "1 of 2 from iteration 7 (tok"]


def test_train_epochs_with_train_iters_is_one_error(datasets, tmp_path):
    r = subprocess.run(command(datasets, tmp_path / "ckpt", "--train-iters", "10"), cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == exitcodes.BAD_INPUT, r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("[")]  # DeepSpeed's import banner
    assert lines == ["error: training.train_epochs and training.train_iters are exclusive; give the run length "
                     "once (--train-epochs, or --train-iters/--train-samples/--train-tokens)"], r.stderr
