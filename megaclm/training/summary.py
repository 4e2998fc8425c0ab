"""The end of a run made visible: a summary block on the console, <save>/summary.json and <save>/report.png.

Written at the end of every run - finished, stopped (--exit-interval, --exit-duration-in-mins, a signal) or
failed in the training loop - by the rank that logs metrics (rank 0 unless pipeline parallel: the first rank
of the last stage). The numbers:

    train loss   the first and last logged train loss of this launch; "whole run" from the first row of
                 metrics.jsonl (every launch of the run since iteration 0), when the run keeps one
    best val     the lowest validation loss logged (whole run; without a metrics file, this launch), its
                 iteration, and its checkpoint if one was kept for it (<save>/best, --save-best)
    tokens       tokens seen since iteration 0, and by this launch
    epoch        the last train row's "epoch", when the loop records one
    wall time    this launch, from the end of start-up (model, data and checkpoint loaded)
    mean MFU     the mean of this launch's logged MFU values (null without a peak: --peak-tflops on CPU), with
                 the mean TFLOP/s per device

The PNG (megaclm.logging.plots) draws the whole run's metrics.jsonl; summary.json holds the block's numbers.
Both are written atomically, and only with --save.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from megaclm.checkpoint.layout import iteration_of, read_best
from megaclm.logging import get_logger
from megaclm.logging.metrics_file import last_per_iteration, read_rows
from megaclm.logging.plots import plot_runs
from megaclm.training.metrics import MetricsLogger
from megaclm.training.progress import Progress
from megaclm.utils.fileio import atomic_write

log = get_logger("megaclm.train")
SUMMARY_FILE, REPORT_FILE = "summary.json", "report.png"


def _first_last(rows: list[dict], key: str) -> tuple[dict | None, dict | None]:
    """The first and last rows with a finite `key`."""
    finite = [r for r in last_per_iteration(rows, key) if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return (finite[0], finite[-1]) if finite else (None, None)


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize(status: str, this_run: list[dict], whole_run: list[dict] | None, *, iteration: int,
              consumed_tokens: int, start_iteration: int, start_tokens: int, wall_s: float, save: str | None) -> dict:
    """The summary's numbers (see the module docstring): `this_run` the rows this launch logged, `whole_run`
    metrics.jsonl's rows (None if the run keeps no file: then "run_loss" is unknown and the best validation
    loss is this launch's)."""
    first, last = _first_last(this_run, "loss")
    run_first, run_last = _first_last(whole_run, "loss") if whole_run is not None else (None, None)
    evals = [r for r in last_per_iteration(this_run if whole_run is None else whole_run, "val_loss")
             if r["val_loss"] is not None]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    kept = read_best(save) if save else None
    train_rows = last_per_iteration(this_run, "loss")
    return {
        "status": status,
        "iteration": iteration, "start_iteration": start_iteration,
        "loss": {"first": first and first["loss"], "first_iteration": first and first["iteration"],
                 "last": last and last["loss"], "last_iteration": last and last["iteration"]},
        "run_loss": {"first": run_first and run_first["loss"], "first_iteration": run_first and run_first["iteration"],
                     "last": run_last and run_last["loss"], "last_iteration": run_last and run_last["iteration"]},
        "best_val": None if best is None else {
            "loss": best["val_loss"], "iteration": best["iteration"],
            "checkpoint": os.path.join(save, kept["tag"]) if kept else None,
            "checkpoint_iteration": iteration_of(kept["tag"]) if kept else None},
        "tokens": consumed_tokens, "tokens_this_run": consumed_tokens - start_tokens,
        "epoch": next((r["epoch"] for r in reversed(train_rows) if r.get("epoch") is not None), None),
        "wall_time_s": wall_s,
        "mean_mfu": _mean([r.get("mfu") for r in train_rows]),
        "mean_tflops": _mean([r.get("tflops") for r in train_rows]),
    }


def _loss_text(part: dict) -> str:
    if part["first"] is None:
        return "none logged"
    return f"{part['first']:.4f} (iter {part['first_iteration']}) -> {part['last']:.4f} (iter {part['last_iteration']})"


def summary_lines(s: dict) -> list[str]:
    """The console block."""
    lines = [f"==== run summary: {s['status']} at iteration {s['iteration']} ====",
             f"train loss   {_loss_text(s['loss'])}"]
    if s["start_iteration"] > 0 and s["run_loss"]["first"] is not None:
        lines.append(f"  whole run  {_loss_text(s['run_loss'])}")
    b = s["best_val"]
    if b is None:
        lines.append("best val     none (no validation ran)")
    else:
        where = (f"checkpoint {b['checkpoint']}" if b["checkpoint"] else
                 "no checkpoint kept for it (--save with --save-best keeps one)")
        lines.append(f"best val     {b['loss']:.4f} at iter {b['iteration']}; {where}")
    lines.append(f"tokens       {s['tokens']:,} seen ({s['tokens_this_run']:,} in this launch, from iteration "
                 f"{s['start_iteration']})")
    if s["epoch"] is not None:
        lines.append(f"epoch        {s['epoch']:.3f}")
    lines.append(f"wall time    {s['wall_time_s']:.1f} s (this launch)")
    mfu = "n/a (no peak FLOP/s known: --peak-tflops)" if s["mean_mfu"] is None else f"{100 * s['mean_mfu']:.1f}%"
    tflops = "" if s["mean_tflops"] is None else f"; {s['mean_tflops']:.3g} TFLOP/s per device"
    lines.append(f"mean MFU     {mfu}{tflops}")
    return lines


def write_run_report(status: str, rows: list[dict], metrics_file: str | None, save: str | None, *,
                     start_iteration: int, **numbers: Any) -> dict:
    """Print the summary block; with `save` also write summary.json and report.png there. The rows come from
    `metrics_file` (cut back to this launch's start when it began: megaclm.logging.metrics_file), else `rows`,
    the records this launch logged; `numbers`: the other keyword arguments of `summarize`."""
    whole_run = None
    if metrics_file and os.path.isfile(metrics_file):
        whole_run = read_rows(metrics_file)
        rows = [r for r in whole_run if r["iteration"] > start_iteration]
    s = summarize(status, rows, whole_run, save=save, start_iteration=start_iteration, **numbers)
    print("\n".join(summary_lines(s)), flush=True)
    if save is not None:
        os.makedirs(save, exist_ok=True)
        with atomic_write(os.path.join(save, SUMMARY_FILE), "w") as f:
            f.write(json.dumps(s, indent=1) + "\n")
        drawn = rows if whole_run is None else whole_run
        if any("loss" in r for r in drawn):
            plot_runs([(os.path.basename(os.path.normpath(save)), drawn)], os.path.join(save, REPORT_FILE))
    return s


def end_of_run(status: str, metrics: MetricsLogger, progress: Progress, started: tuple[int, int], wall_s: float,
               save: str | None) -> None:
    """`write_run_report` on the rank that logs metrics (`metrics`, a MetricsLogger, closed by now), for a run
    that started at `started` (iteration, consumed tokens) and ended with `status`."""
    if not metrics.writer:
        return
    try:
        write_run_report(status, metrics.rows, metrics.path, save, start_iteration=started[0],
                         iteration=progress.iteration, consumed_tokens=progress.consumed_tokens,
                         start_tokens=started[1], wall_s=wall_s)
    except Exception as e:  # noqa: BLE001 - a report that cannot be drawn must not change how the run ended
        log.warning(f"the end-of-run summary/report could not be written: {type(e).__name__}: {e}")
