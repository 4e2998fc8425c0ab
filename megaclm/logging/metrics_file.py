"""metrics.jsonl, a run's record (written by megaclm.training.metrics): read it, and cut it back on resume.

One JSON object a line, each with an "iteration": train rows ("loss", "lr", ...), evaluation rows
("val_loss" or "test_loss") and one-off event rows (a loss-spike "rollback"). A run resumed from the checkpoint
of iteration k trains k+1, k+2, ... again, so before it appends it drops every row past k - train, evaluation
and event rows alike: each describes a step, or what followed one, that the resumed run does again. The rows
at <= k stay, in their order; the file is rewritten atomically. (A loss-spike rollback inside one run keeps
the rows of the steps it replays: its event row marks the turn, and readers take the last row of an
iteration: `last_per_iteration`.)
"""
from __future__ import annotations

import json
import os

from megaclm.utils.errors import UserError
from megaclm.utils.fileio import atomic_write


def _parse(lines: list[str], path: str) -> list[tuple[str, dict]]:
    """(line, row) pairs; a torn last line (a crash during its write) is left out."""
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise UserError(f"{path}:{n}: not a JSON line ({e.msg}); a metrics.jsonl of megaclm has one JSON "
                            "object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
            raise UserError(f"{path}:{n}: a row without an integer \"iteration\"; is this a megaclm metrics.jsonl?")
        rows.append((line, row))
    return rows


def read_rows(path: str) -> list[dict]:
    """Every row of `path`, in file order."""
    with open(path) as f:
        return [row for _, row in _parse(f.readlines(), path)]


def drop_rows_after(path: str, iteration: int) -> int:
    """Rewrite `path` without its rows past `iteration` (see the module docstring); returns how many went.
    No file, or nothing to drop: nothing is written."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = [line if line.endswith("\n") else line + "\n"
            for line, row in _parse(lines, path) if row["iteration"] <= iteration]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        with atomic_write(path, "w") as f:
            f.writelines(kept)
    return dropped


def last_per_iteration(rows: list[dict], key: str) -> list[dict]:
    """The rows holding `key` (e.g. "loss", "val_loss"), the last one of each iteration, by iteration: the
    history the run ended up with (a rollback's replayed steps supersede the first attempt's)."""
    by_iteration = {row["iteration"]: row for row in rows if key in row}
    return [by_iteration[i] for i in sorted(by_iteration)]
