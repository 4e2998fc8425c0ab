#!/usr/bin/env python
"""Compare runs in one picture: train and validation loss, learning rate, gradient norm and tokens/s against
tokens seen, one line per run (the panels of the <save>/report.png every run writes).

    python tools/plot_metrics.py runs/base runs/lr2x --out compare.png
    python tools/plot_metrics.py runs/base/metrics.jsonl

A RUN is a --save directory (its metrics.jsonl) or a metrics.jsonl file; the legend names each run by its
directory. The PNG is written to a temporary name, then renamed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.logging.metrics_file import read_rows  # noqa: E402
from megaclm.logging.plots import plot_runs  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402


def load_run(run: str) -> tuple[str, list[dict]]:
    """(legend name, metrics rows) of a RUN argument."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserError(f"{run}: no metrics.jsonl there; pass a --save directory of pretrain_gpt.py or a "
                        "metrics.jsonl file")
    rows = read_rows(path)
    if not any("loss" in r for r in rows):
        raise UserError(f"{path} has no train rows (no \"loss\"); did the run log an iteration?")
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(directory) if os.path.basename(path) == "metrics.jsonl" else os.path.basename(path)
    return name, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="A --save directory or a metrics.jsonl file.")
    p.add_argument("--out", default="compare.png", help="The PNG to write (default: compare.png).")
    p.add_argument("--title", default=None, help="Figure title (default: the run names).")
    a = p.parse_args()
    runs = [load_run(r) for r in a.runs]
    names = [name for name, _ in runs]
    if len(set(names)) < len(names):  # two runs named alike (a/run, b/run): their paths tell them apart
        runs = [(r, rows) for r, (_, rows) in zip(a.runs, runs)]
    plot_runs(runs, a.out, a.title)
    print(f"wrote {a.out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


if __name__ == "__main__":
    cli_main(main)
