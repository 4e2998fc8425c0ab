"""The picture of one or more runs from their metrics.jsonl rows: <save>/report.png at the end of every run
(megaclm.training.summary) and tools/plot_metrics.py to compare runs.

Four panels against tokens seen: train loss (lines) and validation loss (dashed, dots), learning rate, gradient
norm, tokens/s. One colour per run; the legend names the runs. matplotlib is imported on first use, with the
Agg backend (no display needed), so a run that never draws does not pay for it.
"""
from __future__ import annotations

import numpy as np

from megaclm.logging.metrics_file import last_per_iteration
from megaclm.utils.fileio import atomic_write

# (metrics key, panel title, log-scale y when the values span this factor or more: a spiking gradient norm)
PANELS = (("loss", "loss (train; validation dashed)", None), ("lr", "learning rate", None),
          ("grad_norm", "gradient norm", 100.0), ("tokens_per_sec", "tokens / s", None))


def _series(rows: list[dict], key: str, tokens_at) -> tuple[np.ndarray, np.ndarray]:
    """(tokens seen, value) of the finite values of `key`."""
    points = [(tokens_at(r), r[key]) for r in last_per_iteration(rows, key)
              if isinstance(r[key], (int, float)) and np.isfinite(r[key])]
    return (np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float))


def _tokens_at(train: list[dict]):
    """Tokens seen after an iteration: the train rows' consumed_tokens, interpolated for an evaluation at an
    iteration without a train row (--log-interval > 1)."""
    its = np.array([r["iteration"] for r in train], dtype=float)
    toks = np.array([r["consumed_tokens"] for r in train], dtype=float)
    if len(its) == 0:
        return lambda row: float(row.get("consumed_tokens", row["iteration"]))
    return lambda row: float(row["consumed_tokens"]) if "consumed_tokens" in row else float(
        np.interp(row["iteration"], np.concatenate([[0.0], its]), np.concatenate([[0.0], toks])))


def plot_runs(runs: list[tuple[str, list[dict]]], out: str, title: str | None = None) -> None:
    """Draw `runs` [(name, metrics rows)] into the PNG `out` (written to a temporary name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    spans: dict[str, list[float]] = {key: [] for key, _, _ in PANELS}  # positive values drawn, every run
    for n, (name, rows) in enumerate(runs):
        colour = colours[n % len(colours)]
        train = last_per_iteration(rows, "consumed_tokens")
        tokens_at = _tokens_at(train)
        for ax, (key, _, _) in zip(axes.flat, PANELS):
            x, y = _series(train, key, tokens_at)
            spans[key].extend(y[y > 0])
            ax.plot(x, y, color=colour, linewidth=1.4, label=name if len(runs) > 1 else "train",
                    marker="." if len(x) < 30 else None)
        x, y = _series(rows, "val_loss", tokens_at)
        if len(x):
            axes[0, 0].plot(x, y, color=colour, linestyle="--", marker="o", markersize=4,
                            label=f"{name} validation" if len(runs) > 1 else "validation")
    for ax, (key, panel_title, log_span) in zip(axes.flat, PANELS):
        ax.set_title(panel_title, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_formatter(EngFormatter())
        if log_span is not None and spans[key] and max(spans[key]) >= log_span * min(spans[key]):
            ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("tokens seen")
    axes[0, 0].legend(fontsize=9)
    if len(runs) > 1:
        axes[0, 1].legend(fontsize=9)
    fig.suptitle(title or ", ".join(name for name, _ in runs), fontsize=13)
    fig.tight_layout()
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
