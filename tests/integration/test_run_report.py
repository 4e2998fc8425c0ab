"""The end of a run made visible, on one run stopped and resumed (two `deepspeed` launches, shared by every test):

  first    --train-iters 10 --exit-interval 6 --log-interval 3 --eval-interval 4 --save-best: logs 1, 3, 6,
           evaluates at 4 (the best checkpoint, iter_0000004), stops at 6 with a save (exit status 76)
  resumed  --ckpt-step best: back to iteration 4, so metrics.jsonl loses the row of iteration 6; the first log
           window covers 5-6 only; evaluates at 8 and 10 and finishes

Each launch prints the summary block and writes summary.json and report.png; tools/plot_metrics.py compares runs;
convert_hf.py export --best exports the best checkpoint.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megaclm.checkpoint.layout import read_best
from megaclm.utils import exitcodes
from test_pretrain import REPO, base_args, corpus, records, remove_shm_buffers, run  # noqa: F401


COMMON = ["--zero-stage", "1", "--train-iters", "10", "--log-interval", "3", "--eval-interval", "4",
          "--eval-iters", "1", "--save-best", "--save-interval", "100"]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811
    save = tmp_path_factory.mktemp("report") / "run"
    first = run(corpus, save, COMMON + ["--exit-interval", "6"])
    after_first = records(save)
    first_summary = json.loads((save / "summary.json").read_text())
    resumed = run(corpus, save, COMMON + ["--ckpt-step", "best"])
    return dict(corpus=corpus, save=save, first=first.text(), after_first=after_first, first_summary=first_summary,
                resumed=resumed.text(), rows=records(save))


def summary_block(text: str) -> dict[str, str]:
    """The last summary block of a launch's output: {label: rest of the line}, "" -> its title line."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("==== run summary: "))
    block = {"": lines[start]}
    for line in lines[start + 1:]:
        label, rest = line[:13].strip(), line[13:]
        if not line.startswith(("  whole run  ", "train loss", "best val", "tokens", "epoch", "wall time",
                                "mean MFU")):
            break
        block[label] = rest
    return block


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def test_first_launch_stops_with_a_summary(runs):
    rows = runs["after_first"]
    assert [r["iteration"] for r in train_rows(rows)] == [1, 3, 6]
    assert [r["window_start"] for r in train_rows(rows)] == [1, 2, 4]
    assert [r["iteration"] for r in rows if "val_loss" in r] == [4]
    s = runs["first_summary"]
    assert s["status"] == "stopped (--exit-interval 6)" and s["iteration"] == 6 and s["start_iteration"] == 0
    first, last = train_rows(rows)[0], train_rows(rows)[-1]
    assert (s["loss"]["first"], s["loss"]["last"]) == (first["loss"], last["loss"])
    assert s["best_val"] == {"loss": rows[2]["val_loss"], "iteration": 4,
                             "checkpoint": str(runs["save"] / "iter_0000004"), "checkpoint_iteration": 4}
    block = summary_block(runs["first"])
    assert block[""] == "==== run summary: stopped (--exit-interval 6) at iteration 6 ===="
    assert block["train loss"] == f"{first['loss']:.4f} (iter 1) -> {last['loss']:.4f} (iter 6)"
    assert "whole run" not in block  # this launch is the whole run


def test_resume_from_best_drops_the_replayed_rows_and_labels_the_partial_window(runs):
    text, rows = runs["resumed"], runs["rows"]
    assert f"loaded checkpoint {runs['save'] / 'iter_0000004'}" in text  # --ckpt-step best
    assert f"{runs['save'] / 'metrics.jsonl'}: dropped 1 rows past iteration 4" in text
    train = train_rows(rows)
    assert [r["iteration"] for r in train] == [1, 3, 6, 9, 10]  # each iteration once
    assert [r["window_start"] for r in train] == [1, 2, 5, 7, 10]
    assert train[:2] == train_rows(runs["after_first"])[:2]  # the rows before the checkpoint are kept as they were
    assert train[2]["consumed_tokens"] == 6 * 16 * 64
    assert "| avg of iters 5-6" in text and "| avg of iters 10-10" in text
    assert [r["iteration"] for r in rows if "val_loss" in r] == [4, 8, 10]
    assert [r["iteration"] for r in rows if "test_loss" in r] == [10]


def test_summary_block_and_json_match_the_metrics(runs):
    rows, save = runs["rows"], runs["save"]
    train = train_rows(rows)
    s = json.loads((save / "summary.json").read_text())
    assert s["status"] == "finished" and s["iteration"] == 10 and s["start_iteration"] == 4
    assert s["loss"] == {"first": train[2]["loss"], "first_iteration": 6, "last": train[-1]["loss"],
                         "last_iteration": 10}
    assert s["run_loss"]["first"] == train[0]["loss"] and s["run_loss"]["first_iteration"] == 1
    evals = [r for r in rows if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    kept = read_best(str(save))
    assert s["best_val"]["loss"] == best["val_loss"] and s["best_val"]["iteration"] == best["iteration"]
    assert s["best_val"]["checkpoint"] == str(save / kept["tag"]) and kept["val_loss"] == best["val_loss"]
    assert s["tokens"] == train[-1]["consumed_tokens"] == 10 * 16 * 64
    assert s["tokens_this_run"] == 6 * 16 * 64
    assert s["mean_mfu"] is None  # no peak FLOP/s on CPU
    assert s["mean_tflops"] == pytest.approx(np.mean([r["tflops"] for r in train[2:]]))
    assert s["wall_time_s"] > 0
    block = summary_block(runs["resumed"])
    assert block[""] == "==== run summary: finished at iteration 10 ===="
    assert block["train loss"] == f"{train[2]['loss']:.4f} (iter 6) -> {train[-1]['loss']:.4f} (iter 10)"
    assert block["whole run"] == f"{train[0]['loss']:.4f} (iter 1) -> {train[-1]['loss']:.4f} (iter 10)"
    assert block["best val"] == f"{best['val_loss']:.4f} at iter {best['iteration']}; checkpoint {save / kept['tag']}"
    assert block["tokens"] == "10,240 seen (6,144 in this launch, from iteration 4)"
    assert block["wall time"] == f"{s['wall_time_s']:.1f} s (this launch)"
    assert block["mean MFU"] == f"n/a (no peak FLOP/s known: --peak-tflops); {s['mean_tflops']:.3g} TFLOP/s per device"


def assert_picture(path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    pixels = image.imread(str(path))
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 900
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 50 and pixels[..., :3].std() > 0.05  # curves, text and axes, not a blank page


def test_report_png_shows_the_run(runs):
    assert_picture(runs["save"] / "report.png")
    assert not [p for p in os.listdir(runs["save"]) if p.endswith(".tmp")]


def test_plot_metrics_compares_runs_and_refuses_a_run_without_metrics(runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(runs["save"] / "metrics.jsonl", other / "metrics.jsonl")
    out = tmp_path / "compare.png"
    r = subprocess.run([sys.executable, "tools/plot_metrics.py", str(runs["save"]), str(other / "metrics.jsonl"),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {out} (2 runs)", r.stderr
    assert_picture(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "tools/plot_metrics.py", str(runs["save"]), str(empty)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == exitcodes.BAD_INPUT
    assert r.stderr.strip() == (f"error: {empty}: no metrics.jsonl there; pass a --save directory of "
                                "pretrain_gpt.py or a metrics.jsonl file")


def test_export_best_and_the_error_without_a_best(runs, tmp_path):
    # The run as the first launch left its `best` (iter_0000004, older than `latest`): export --best takes it.
    save = tmp_path / "run"
    shutil.copytree(runs["save"], save, ignore=shutil.ignore_patterns("iter_0000006", "iter_0000008"))
    first_best = runs["first_summary"]["best_val"]
    (save / "best").write_text(json.dumps({"tag": "iter_0000004", "val_loss": first_best["loss"]}))
    tokenizer = tmp_path / "gpt2"  # export needs HF tokenizer files; which ones does not matter here
    tokenizer.mkdir()
    shutil.copy(REPO / "tests/data/gpt2-vocab.json", tokenizer / "vocab.json")
    shutil.copy(REPO / "tests/data/gpt2-merges.txt", tokenizer / "merges.txt")
    r = subprocess.run([sys.executable, "tools/checkpoint/convert_hf.py", "export", "--load", str(save), "--best",
                        "--out", str(tmp_path / "hf"), "--tokenizer-dir", str(tokenizer), "--vocab-size", "1000"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"exported {save / 'iter_0000004'} " in r.stderr and (tmp_path / "hf" / "config.json").exists()
    (save / "best").unlink()
    r = subprocess.run([sys.executable, "pretrain_gpt.py", *base_args(runs["corpus"], save), "--train-iters", "10",
                        "--ckpt-step", "best", "--validate-only"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == exitcodes.BAD_INPUT
    assert r.stderr.splitlines()[-1] == (f"error: --ckpt-step best: {save} has no `best` record (a run with "
                                         "--save-best writes it at its lowest validation loss); pass --ckpt-step "
                                         "N, or train with --save-best")
