"""metrics.jsonl cut back on resume (megaclm.logging.metrics_file) and `--ckpt-step best` in the config."""
import json

import pytest

from megaclm.checkpoint.layout import tag_at_step
from megaclm.config import parse_args
from megaclm.logging.metrics_file import drop_rows_after, last_per_iteration, read_rows
from megaclm.utils.errors import UserError


def write(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_rows_past_the_checkpoint_go_train_eval_and_event_alike(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iteration": 1, "loss": 7.0}, {"iteration": 2, "loss": 6.0}, {"iteration": 2, "val_loss": 6.5},
            {"iteration": 3, "loss": 5.0}, {"iteration": 2, "rollback": 1}, {"iteration": 3, "loss": 5.5},
            {"iteration": 4, "val_loss": 5.4}]
    write(path, rows, tail='{"iteration": 5, "lo')  # a write torn by a crash
    assert drop_rows_after(str(path), 2) == 4
    assert read_rows(str(path)) == [rows[0], rows[1], rows[2], rows[4]]
    assert drop_rows_after(str(path), 2) == 0 and drop_rows_after(str(tmp_path / "none.jsonl"), 0) == 0
    assert last_per_iteration(rows, "loss") == [rows[0], rows[1], rows[5]]  # the replay after the rollback wins


def test_a_broken_line_inside_the_file_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss": 2.0}\nnot json\n{"iteration": 2, "loss": 1.0}\n')
    with pytest.raises(UserError, match=f"{path}:2: not a JSON line"):
        read_rows(str(path))


def test_ckpt_step_takes_an_iteration_or_best(tmp_path):
    step = lambda *a: parse_args(["--load", str(tmp_path), "--ckpt-step", *a], sections=["checkpoint"])  # noqa: E731
    assert step("best").cfg.checkpoint.ckpt_step == "best" and step("12").cfg.checkpoint.ckpt_step == 12
    with pytest.raises(UserError, match="checkpoint.ckpt_step expects an integer or one of 'best', got 'latest'"):
        step("latest")
    with pytest.raises(UserError, match="--ckpt-step best: .* has no `best` record"):
        tag_at_step(str(tmp_path), "best")
    (tmp_path / "best").write_text(json.dumps({"tag": "iter_0000040", "val_loss": 2.5}))
    assert tag_at_step(str(tmp_path), "best") == "iter_0000040" and tag_at_step(str(tmp_path), 7) == "iter_0000007"
