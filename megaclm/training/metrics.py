"""Where training metrics go: one console line, JSON lines, TensorBoard, W&B, a tqdm bar.

Only the writer rank (first rank of the last pipeline stage, where the loss is) logs. Every
`--log-interval` iterations one record:

    {"iteration", "consumed_samples", "consumed_tokens", "loss", "lr", "grad_norm", "loss_scale",
     "tokens_per_sec", "tflops", "mfu", "step_time", "memory_gb", "skipped_steps",
     "rank_step_time" (every rank's mean step time, by global rank), "step_time_max", "slowest_rank",
     "window_start", "epoch" (consumed samples / samples per epoch, megaclm.data.epochs; null with --mock-data),
     "phase" (the --data-mixing-schedule phase of the iteration's step, 0 without one), "blend_weights" (the
     weights in force, one per training dataset; null with --mock-data), "seq_length" (the step's, after any
     sequence-length warmup)}

plus, for Mixture-of-Experts models, "router_loss" (what the router losses added to the training loss;
"loss" is the LM loss without it), "moe_aux_loss" and "moe_z_loss" (unweighted, averaged over the MoE
layers: the load-balancing loss is 1 when routing is perfectly balanced).

and after each evaluation {"iteration", "val_loss", "val_ppl"} (or "test_loss", "test_ppl"). tflops is
model FLOP/s per device (6N + 12 L d T per token, megaclm.model.flops; no recompute counted), mfu
= tflops / --peak-tflops (default by detected GPU; null on CPU unless given).

"window_start" is the first iteration the averages (loss, step time, tokens/s) cover: windows end at multiples
of --log-interval (and at iteration 1, and when the run stops), so the first window after a resume covers
only the iterations this launch trained. A resumed run first drops the rows past its checkpoint from
metrics.jsonl (megaclm.logging.metrics_file), so each iteration appears once.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Any

import torch

from megaclm.config.logging import LoggingConfig
from megaclm.logging import get_logger
from megaclm.logging.metrics_file import drop_rows_after

log = get_logger("megaclm.train")

# Dense peak TFLOP/s per device by (GPU name fragment, precision); fp32 uses the TF32 tensor-core rate.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 125.0, "fp16": 125.0, "fp32": 15.7},
}


def detect_peak_tflops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision]
    return None


def memory_gb() -> float:
    """Peak device memory (GPU) or peak resident memory of this process (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


class MetricsLogger:
    """Console + JSON lines + TensorBoard + W&B on the writer rank; a no-op elsewhere."""

    def __init__(self, logging_cfg: LoggingConfig, *, writer: bool, metrics_file: str | None, total_iters: int,
                 start_iter: int, run_config: dict, default_wandb_dir: str | None):
        self.writer, self.cfg = writer, logging_cfg
        self.metrics_file, self.tb, self.wandb, self.bar = None, None, None, None
        # Without a metrics file: every record of this launch, for the end-of-run summary (else it reads the file)
        self.rows: list[dict] = []
        self.path = metrics_file if writer else None
        if not writer:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            dropped = drop_rows_after(metrics_file, start_iter)
            if dropped:
                log.info(f"{metrics_file}: dropped {dropped} rows past iteration {start_iter}, where this run "
                         "starts: it trains those iterations again")
            self.metrics_file = open(metrics_file, "a", buffering=1)
        if logging_cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(logging_cfg.tensorboard_dir)
        if logging_cfg.wandb_project:
            import wandb

            save_dir = logging_cfg.wandb_save_dir or default_wandb_dir or "wandb"
            os.makedirs(save_dir, exist_ok=True)
            self.wandb = wandb.init(project=logging_cfg.wandb_project, name=logging_cfg.wandb_exp_name,
                                    dir=save_dir, config=run_config, resume="allow")
        if logging_cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True)

    def _emit(self, record: dict, prefix: str) -> None:
        # JSON has no NaN/inf: a non-finite value (a diverged eval, a NaN grad norm) is recorded as missing.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.metrics_file is None:
            self.rows.append(record)
        else:
            self.metrics_file.write(json.dumps(record) + "\n")
        step = record["iteration"]
        # Scalars only (the per-rank step-time list stays in the JSON lines).
        scalars = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def step(self, loss: float | None) -> None:
        """Advance the progress bar by one iteration."""
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def train(self, record: dict) -> None:
        if not self.writer:
            return
        self._emit(record, "train")
        r = record
        self._print(
            f"iter {r['iteration']:>7d} | samples {r['consumed_samples']} | tokens {r['consumed_tokens']} | "
            f"epoch {_fmt(r.get('epoch'), '.3f')} | "
            f"loss {_fmt(r['loss'], '.4f')} | lr {_fmt(r['lr'], '.3e')} | grad norm {_fmt(r['grad_norm'], '.3f')} | "
            f"loss scale {_fmt(r['loss_scale'], '.0f')} | tok/s {_fmt(r['tokens_per_sec'], '.0f')} | "
            f"TFLOP/s/dev {_fmt(r['tflops'], '.2f')} | MFU {_fmt(r['mfu'], '.1%')} | "
            f"step {_fmt(r['step_time'], '.3f')}s | mem {_fmt(r['memory_gb'], '.2f')}GB"
            + (f" | skipped {r['skipped_steps']}" if r.get("skipped_steps") else "")
            + self._window_note(r)
            + (f" | moe aux {r['moe_aux_loss']:.4f} z {r['moe_z_loss']:.4f}" if "moe_aux_loss" in r else ""))

    def _window_note(self, r: dict) -> str:
        """" | avg of iters 26-30" when the averages cover less than a whole --log-interval (after a resume, at
        a stop); nothing for whole windows and iteration 1."""
        start, it = r.get("window_start"), r["iteration"]
        if start is None or it == 1 or start == it - self.cfg.log_interval + 1:
            return ""
        return f" | avg of iters {start}-{it}"

    def event(self, record: dict, line: str) -> None:
        """A one-off record (e.g. a loss-spike rollback) in metrics.jsonl, and its console line."""
        if not self.writer:
            return
        if self.metrics_file is None:
            self.rows.append(record)
        else:
            self.metrics_file.write(json.dumps(record) + "\n")
        self._print(line)

    def evaluation(self, iteration: int, split: str, loss: float) -> None:
        if not self.writer:
            return
        ppl = math.exp(loss) if loss <= 700.0 else math.inf  # exp overflows past ~709; NaN -> inf too
        self._emit({"iteration": iteration, f"{split}_loss": loss, f"{split}_ppl": ppl}, split)
        self._print(f"{'validation' if split == 'val' else split} at iter {iteration} | loss {_fmt(loss, '.4f')} | "
                    f"perplexity {_fmt(ppl, '.2f')}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
