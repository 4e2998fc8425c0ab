"""The training loop: step, log, evaluate, checkpoint, and stop cleanly.

Per iteration: set the lr from (iteration, consumed tokens); run one global batch (accumulation
inside: engine.backward/step per micro-batch, or PipelineEngine.train_batch); all-reduce the loss
over data-parallel ranks (under a sequence split each rank's loss is its tokens' share of the
micro-batch mean: DeepSpeed sums gradients over the seq axis and averages them over dp); count a non-finite loss as a skipped step (DeepSpeed's optimizers skip a
step with non-finite gradients, see megaclm.training.engine) and stop after
`--max-consecutive-nan-steps` in a row; log; evaluate every `--eval-interval`; save every
`--save-interval`. Stops at the end of training, at `--exit-interval`, after
`--exit-duration-in-mins`, or on SIGTERM/SIGUSR1 (SLURM preemption), saving first and returning
normally (exit status 0). Signals and the clock are agreed on by all ranks with one all-reduce per
iteration, so every rank stops at the same iteration.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from megaclm.checkpoint.deepspeed_ckpt import mark_best, save_checkpoint
from megaclm.checkpoint.layout import tag_for
from megaclm.logging import get_logger
from megaclm.training.batch import BatchSource
from megaclm.training.metrics import MetricsLogger, memory_gb
from megaclm.training.schedules import LRSchedule

log = get_logger("megaclm.train")



def _new_window() -> dict:
    """Sums over the steps since the last log line."""
    return {"loss": [], "time": 0.0, "tokens": 0, "flops": 0.0, "steps": 0}

class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


@dataclass
class Progress:
    """megaclm's training progress; saved in every checkpoint's client state."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None

    def state_dict(self) -> dict:
        return asdict(self)


class StopSignals:
    """Remember SIGTERM / SIGUSR1 instead of dying, so the loop can save and exit at a step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _loss_scale(engine: Any) -> float | None:
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    return _to_float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None))


class Trainer:
    def __init__(self, cfg: Any, derived: Any, engine: Any, pstate: Any, data: BatchSource, schedule: LRSchedule,
                 metrics: MetricsLogger, progress: Progress, *, flops_per_token: Callable[[int], float],
                 peak_tflops: float | None, checkpoint_meta: dict):
        self.cfg, self.derived, self.engine, self.pstate = cfg, derived, engine, pstate
        self.data, self.schedule, self.metrics, self.progress = data, schedule, metrics, progress
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.checkpoint_meta = checkpoint_meta
        self.pipeline = pstate.pp_size > 1
        # Collectives run on the training device (NCCL takes CUDA tensors only).
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.start_time = time.time()
        self.consecutive_nan = 0
        self.last_saved = None
        self._pipe_seq_length = None
        # Test hook: iterations (1-based) whose loss is replaced by NaN, to exercise the skip logic.
        self.inject_nan = {int(x) for x in os.environ.get("MEGACLM_TEST_NAN_ITERS", "").split(",") if x}

    # ---- one step -------------------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        p = self.progress
        lr = self.schedule.lr(p.iteration, p.consumed_tokens)
        decoupled = self.schedule.decoupled_lr(p.iteration, p.consumed_tokens)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = decoupled if group.get("decoupled_lr") else lr
        return lr

    def _micro_loss(self, batch: dict) -> torch.Tensor:
        losses = self.engine(batch["tokens"], position_ids=batch["position_ids"],
                             document_ids=batch.get("document_ids"), labels=batch["labels"])  # (B, T) fp32
        mask = batch["loss_mask"]
        count = mask.sum()
        if self.pstate.seq_size > 1:  # this rank holds T/n tokens: divide by the whole micro-batch's count
            count = count.detach().clone()
            dist.all_reduce(count, group=self.pstate.seq_group)
        return (losses.float() * mask).sum() / count.clamp(min=1.0)

    def _dp_mean(self, value: torch.Tensor) -> float:
        """Mean over dp of the sum over seq (the parts of one micro-batch's loss)."""
        value = value.detach().float().clone()
        if self.pstate.dp_size * self.pstate.seq_size > 1:
            dist.all_reduce(value, group=self.pstate.seq_dp_group)
            value /= self.pstate.dp_size
        return value.item()

    def train_step(self, seq_length: int) -> float:
        micro = self.data.micro_batches(self.progress.consumed_samples, seq_length)
        nan = (self.progress.iteration + 1) in self.inject_nan
        if self.pipeline:
            if nan:
                raise ValueError("MEGACLM_TEST_NAN_ITERS is not supported with pipeline parallelism")
            self._pipe_shape(seq_length)
            return self.engine.train_batch(data_iter=micro).item()  # averaged over micro and dp by DeepSpeed
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.derived.grad_accum_steps):
            loss = self._micro_loss(next(micro))
            if nan:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return self._dp_mean(total / self.derived.grad_accum_steps)

    def _pipe_shape(self, seq_length: int) -> None:
        """The pipeline engine reuses its p2p buffers: tell it when a curriculum changes the length."""
        if seq_length != self._pipe_seq_length:
            self.engine.reset_activation_shape()
            self._pipe_seq_length = seq_length

    # ---- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> float | None:
        if self.cfg.training.eval_iters == 0 or not self.data.has_split(split):
            return None
        self.engine.eval()
        seq = self.cfg.data.seq_length
        losses = []
        for i in range(self.cfg.training.eval_iters):
            micro = self.data.eval_micro_batches(split, i, seq)
            if self.pipeline:
                self._pipe_shape(seq)
                losses.append(self.engine.eval_batch(data_iter=micro).item())
            else:
                total = sum(self._micro_loss(next(micro)).float() for _ in range(self.derived.grad_accum_steps))
                losses.append(self._dp_mean(total / self.derived.grad_accum_steps))
        self.engine.train()
        loss = sum(losses) / len(losses)
        self.metrics.evaluation(self.progress.iteration, "val" if split == "valid" else split, loss)
        return loss

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> str | None:
        c = self.cfg.checkpoint
        if c.save is None or self.last_saved == self.progress.iteration:
            return None
        client = {"progress": self.progress.state_dict(), "data": self.data.state_dict(),
                  "world_size": self.pstate.world_size}
        tag = save_checkpoint(self.engine, c.save, self.progress.iteration, client, pstate=self.pstate,
                              config_tree=self.cfg.to_dict(), meta={**self.checkpoint_meta, **self.progress.state_dict()},
                              total_limit=c.save_total_limit)
        self.last_saved = self.progress.iteration
        return tag

    def _after_eval(self, val_loss: float | None) -> None:
        c = self.cfg.checkpoint
        if val_loss is None or not c.save_best or not math.isfinite(val_loss):
            return
        if self.progress.best_val_loss is None or val_loss < self.progress.best_val_loss:
            self.progress.best_val_loss = val_loss
            self.save()
            mark_best(c.save, tag_for(self.progress.iteration), val_loss)

    # ---- stopping -------------------------------------------------------------------------------------------
    def _should_stop(self, signals: StopSignals) -> str | None:
        t = self.cfg.training
        elapsed_min = (time.time() - self.start_time) / 60
        flags = torch.tensor([float(signals.received is not None),
                              float(t.exit_duration_in_mins is not None and elapsed_min > t.exit_duration_in_mins)],
                             device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return "signal"
        if flags[1]:
            return f"--exit-duration-in-mins {t.exit_duration_in_mins}"
        if t.exit_interval and self.progress.iteration % t.exit_interval == 0:
            return f"--exit-interval {t.exit_interval}"
        return None

    def _done(self) -> bool:
        t, p = self.cfg.training, self.progress
        if t.train_tokens is not None and p.consumed_tokens >= t.train_tokens:
            return True
        if t.train_samples is not None:
            return p.consumed_samples >= t.train_samples
        return p.iteration >= self.derived.train_iters

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self) -> str:
        """Train until done or told to stop; returns why it stopped."""
        t, lg = self.cfg.training, self.cfg.logging
        signals = StopSignals()
        window = _new_window()
        reason = "finished"
        try:
            while not self._done():
                seq = self.data.seq_length_at(self.progress)
                lr = self._set_lr()
                start = time.time()
                loss = self.train_step(seq)
                step_time = time.time() - start
                p = self.progress
                p.iteration += 1
                p.consumed_samples += self.derived.global_batch_size
                step_tokens = self.derived.global_batch_size * seq
                p.consumed_tokens += step_tokens
                self.data.advance()
                if math.isfinite(loss):
                    self.consecutive_nan = 0
                    window["loss"].append(loss)
                else:
                    p.skipped_steps += 1
                    self.consecutive_nan += 1
                    log.warning(f"iteration {p.iteration}: loss is {loss}; step skipped "
                                f"({self.consecutive_nan} in a row, {p.skipped_steps} in total)")
                    if self.consecutive_nan >= t.max_consecutive_nan_steps:
                        raise TrainingDiverged(
                            f"{self.consecutive_nan} consecutive iterations (up to {p.iteration}) had a NaN/inf "
                            f"loss (--max-consecutive-nan-steps {t.max_consecutive_nan_steps}); stopping. Resume "
                            "from the last checkpoint with a lower --lr, more warmup or --clip-grad")
                window["time"] += step_time
                window["tokens"] += step_tokens
                # FLOPs per step at the step's own length: exact across the seqlen warmup.
                window["flops"] += step_tokens * self.flops_per_token(seq)
                window["steps"] += 1
                self.metrics.step(loss if math.isfinite(loss) else None)
                if p.iteration % lg.log_interval == 0 or p.iteration == 1:  # iteration 1 shows the starting loss
                    self._log(lr, window)
                    window = _new_window()
                if p.iteration % t.eval_interval == 0 and not self._done():
                    self._after_eval(self.evaluate("valid"))
                if self.cfg.checkpoint.save_interval and p.iteration % self.cfg.checkpoint.save_interval == 0:
                    self.save()
                stop = self._should_stop(signals)
                if stop is not None:
                    reason = stop
                    log.info(f"stopping at iteration {p.iteration}: {stop}; saving a checkpoint")
                    break
            if reason == "finished":
                self._after_eval(self.evaluate("valid"))
                self.evaluate("test")
            self.save()
        finally:
            signals.restore()
        return reason

    def _log(self, lr: float, window: dict) -> None:
        p, n = self.progress, len(window["loss"])
        world = self.pstate.world_size
        tokens_per_sec = window["tokens"] / window["time"] if window["time"] > 0 else None
        tflops = mfu = None
        if tokens_per_sec is not None:
            tflops = window["flops"] / window["time"] / world / 1e12
            mfu = tflops / self.peak_tflops if self.peak_tflops else None
        self.metrics.train({
            "iteration": p.iteration, "consumed_samples": p.consumed_samples, "consumed_tokens": p.consumed_tokens,
            "loss": sum(window["loss"]) / n if n else None, "lr": lr,
            "grad_norm": _to_float(self.engine.get_global_grad_norm()), "loss_scale": _loss_scale(self.engine),
            "tokens_per_sec": tokens_per_sec, "tflops": tflops, "mfu": mfu,
            "step_time": window["time"] / max(window["steps"], 1), "memory_gb": memory_gb(), "skipped_steps": p.skipped_steps,
        })
