"""The training loop: step, log, evaluate, checkpoint, and stop cleanly.

    while not done:
        callbacks.pre_step                    fault injection, user hooks
        step                                  lr, the global batch (megaclm.training.step), progress
        callbacks.post_step                   spike guard, NaN/inf guard -> maybe ROLLBACK
        logger.step                           the metrics window; a line every --log-interval
        rollback | evaluate every --eval-interval | save every --save-interval
        callbacks.should_stop                 a signal, --exit-duration-in-mins, --exit-interval
    final evaluation (when finished), final save

The parts: TrainStep and Evaluator (megaclm.training.step), Checkpointer (megaclm.training.checkpointer:
save cadence, best, the one restore path), StepLogger (below), and the callbacks
(megaclm.training.callbacks: the loss-spike guard, the NaN/inf guard, the hang watchdog, the step
profiler, the stop conditions, the user's --callbacks). A stop saves first and returns why (exit status 76); stop
requests and the clock are agreed on by all ranks with one all-reduce per iteration, so every rank
stops at the same iteration; an evaluation checks for a stop request before each of its batches (one
all-reduce each) and is abandoned on one. Every log line all-gathers the ranks' step times
(`rank_step_time`, `slowest_rank`).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from megaclm.config import MegaclmConfig
from megaclm.config.derived import Derived
from megaclm.logging import get_logger
from megaclm.model.gpt import MOE_STATS
from megaclm.parallel.device import rank_device
from megaclm.parallel.state import ParallelState
from megaclm.training.batch import BatchSource
from megaclm.training.callbacks import (ROLLBACK, Callbacks, NanGuard, Profiler, SpikeCallback, StepResult,
                                        StopConditions, WatchdogCallback)
from megaclm.training.checkpointer import Checkpointer
from megaclm.training.metrics import MetricsLogger, memory_gb
from megaclm.training.progress import Progress
from megaclm.training.schedules import LRSchedule
from megaclm.training.spike import SpikeGuard
from megaclm.training.step import Evaluator, TrainStep
from megaclm.utils import signals

log = get_logger("megaclm.train")


def _to_float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def _loss_scale(engine: Any) -> float | None:
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    return _to_float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None))


class StepLogger:
    """Sums over the steps since the last log line; one line (and metrics record) every --log-interval
    iterations, at iteration 1 (the starting loss), before a rollback and at the end."""

    def __init__(self, metrics: MetricsLogger, engine: Any, pstate: ParallelState, data: BatchSource,
                 progress: Progress, *, log_interval: int, flops_per_token: Callable[[int], float],
                 peak_tflops: float | None, device: Any):
        self.metrics, self.engine, self.pstate, self.data, self.progress = metrics, engine, pstate, data, progress
        self.log_interval, self.flops_per_token, self.peak_tflops = log_interval, flops_per_token, peak_tflops
        self.device = device
        self.lr: float | None = None
        self.window = self._new_window()

    @staticmethod
    def _new_window() -> dict:
        return {"loss": [], "time": 0.0, "tokens": 0, "flops": 0.0, "steps": 0, "moe": []}

    def step(self, result: StepResult, moe: list[float] | None, force: bool) -> None:
        w, finite = self.window, math.isfinite(result.loss)
        if finite and not result.spike:
            w["loss"].append(result.loss)
        w["time"] += result.time_s
        w["tokens"] += result.tokens
        # FLOPs per step at the step's own length: exact across the seqlen warmup.
        w["flops"] += result.tokens * self.flops_per_token(result.seq_length)
        w["steps"] += 1
        if moe is not None and finite:
            w["moe"].append(moe)
        self.lr = result.lr
        self.metrics.step(result.loss if finite else None)
        it = self.progress.iteration
        if it % self.log_interval == 0 or it == 1 or force:
            self.flush()

    def flush(self) -> None:
        """Log the window's steps, if any: every trained step is logged."""
        if self.window["steps"]:
            self._log(self.window)
            self.window = self._new_window()

    def _rank_step_times(self, window: dict) -> list[float]:
        """Every rank's mean step time over the window (one all-gather per log line), to name stragglers."""
        mine = torch.tensor([window["time"] / max(window["steps"], 1)], dtype=torch.float64, device=self.device)
        if not dist.is_initialized() or self.pstate.world_size == 1:
            return [mine.item()]
        gathered = [torch.zeros_like(mine) for _ in range(self.pstate.world_size)]
        dist.all_gather(gathered, mine)
        return [t.item() for t in gathered]

    def _log(self, window: dict) -> None:
        p, n = self.progress, len(window["loss"])
        world = self.pstate.world_size
        rank_times = self._rank_step_times(window)
        tokens_per_sec = window["tokens"] / window["time"] if window["time"] > 0 else None
        tflops = mfu = None
        if tokens_per_sec is not None:
            tflops = window["flops"] / window["time"] / world / 1e12
            mfu = tflops / self.peak_tflops if self.peak_tflops else None
        self.metrics.train({
            "iteration": p.iteration, "consumed_samples": p.consumed_samples, "consumed_tokens": p.consumed_tokens,
            "loss": sum(window["loss"]) / n if n else None, "lr": self.lr,
            "grad_norm": _to_float(self.engine.get_global_grad_norm()), "loss_scale": _loss_scale(self.engine),
            "tokens_per_sec": tokens_per_sec, "tflops": tflops, "mfu": mfu,
            "step_time": window["time"] / max(window["steps"], 1), "memory_gb": memory_gb(), "skipped_steps": p.skipped_steps,
            **({k: sum(m[i] for m in window["moe"]) / len(window["moe"]) for i, k in enumerate(MOE_STATS)}
               if window["moe"] else {}),
            "rank_step_time": rank_times, "step_time_max": max(rank_times),
            "slowest_rank": max(range(len(rank_times)), key=rank_times.__getitem__),
            "window_start": p.iteration - window["steps"] + 1,  # the first iteration the averages cover
            **self.data.data_fields(p.iteration - 1, p.consumed_samples),  # epoch, phase, blend weights, seq length
        })


class Trainer:
    def __init__(self, cfg: MegaclmConfig, derived: Derived, engine: Any, pstate: ParallelState, data: BatchSource,
                 schedule: LRSchedule, metrics: MetricsLogger, progress: Progress, *,
                 flops_per_token: Callable[[int], float], peak_tflops: float | None, checkpoint_meta: dict,
                 callbacks: list | tuple = ()):
        """`callbacks`: the user's (--callbacks), run after the built-in ones (megaclm.training.callbacks)."""
        self.cfg, self.derived, self.engine, self.pstate = cfg, derived, engine, pstate
        self.data, self.schedule, self.metrics, self.progress = data, schedule, metrics, progress
        # Collectives run on the training device (NCCL takes CUDA tensors only).
        self.device = rank_device()
        self.start_time = time.time()
        r = cfg.resilience
        self.guard = SpikeGuard(r.spike_zscore, r.spike_window) if r.spike_zscore is not None else None
        self.train_step = TrainStep(engine, pstate, data, derived.grad_accum_steps,
                                    moe=cfg.model.num_experts is not None, guard=self.guard, device=self.device)
        self.evaluator = Evaluator(self.train_step, data, cfg.training, cfg.data.seq_length, metrics)
        self.nan_guard = NanGuard(r.max_consecutive_nan_steps)
        profiler = Profiler.for_rank(cfg, pstate.rank)  # None without --profile: nothing runs per step
        self.callbacks = Callbacks(
            ([SpikeCallback(self.guard, r, derived.global_batch_size)] if self.guard is not None else [])
            + [self.nan_guard]
            + ([WatchdogCallback(r.hang_timeout_s, cfg.checkpoint.save, pstate.rank)] if r.hang_timeout_s else [])
            + ([profiler] if profiler is not None else [])
            + [StopConditions(cfg.training), *callbacks])
        self.checkpointer = Checkpointer(cfg, engine, pstate, {"progress": progress, "data": data, "spike": self.guard},
                                         checkpoint_meta, bad_steps=self.bad_steps, device=self.device,
                                         files_written=self.callbacks.checkpoint_files_written)
        self.logger = StepLogger(metrics, engine, pstate, data, progress, log_interval=cfg.logging.log_interval,
                                 flops_per_token=flops_per_token, peak_tflops=peak_tflops, device=self.device)
        self._shown_phase: int | None = None  # the data phase last announced on the console

    def train(self) -> str:
        """Train until done or told to stop; returns why it stopped."""
        signals.install()  # pretrain_gpt.py did at start-up; other callers get the handlers here
        reason = None
        self.callbacks.train_start(self)
        try:
            while not self.done():
                self.callbacks.pre_step(self)
                result = self.step()
                action = self.callbacks.post_step(self, result)
                self.logger.step(result, self.train_step.last_moe, force=action == ROLLBACK)
                if action == ROLLBACK:
                    self.rollback()
                    self.callbacks.heartbeat(self)
                    continue
                self.callbacks.heartbeat(self)
                if self.evaluator.due(self.progress.iteration) and not self.done():
                    self.validate()
                if self.checkpointer.due(self.progress.iteration):
                    self.save()
                reason = self.callbacks.should_stop(self)
                if reason is not None:
                    log.info(f"stopping at iteration {self.progress.iteration}: {reason}; saving a checkpoint")
                    break
            self.logger.flush()
            if reason is None:
                reason = "finished"
                self.validate()
                self.evaluate("test")
                if self.evaluator.interrupted is not None:  # a requeue resumes here and evaluates again
                    reason = self.evaluator.interrupted
            self.save(final=True)
            self.checkpointer.wait()
        finally:
            self.callbacks.train_end(self)
        return reason

    # ---- the parts the loop calls -----------------------------------------------------------------------------
    def done(self) -> bool:
        t, p = self.cfg.training, self.progress
        if t.train_tokens is not None and p.consumed_tokens >= t.train_tokens:
            return True
        if t.train_samples is not None:
            return p.consumed_samples >= t.train_samples
        return p.iteration >= self.derived.train_iters

    def step(self) -> StepResult:
        """One optimizer step, and the progress past it."""
        p = self.progress
        self._announce_phase()
        seq = self.data.seq_length_at(p)
        lr = self.train_step.set_lr(self.schedule, p)
        start = time.time()
        loss, spike = self.train_step(p.consumed_samples, seq)
        step_time = time.time() - start
        first_sample = p.consumed_samples
        p.iteration += 1
        tokens = self.derived.global_batch_size * seq
        p.consumed_tokens += tokens
        self.data.advance()
        p.consumed_samples = self.data.consumed_samples  # past any skipped batches
        return StepResult(loss, spike, lr, seq, tokens, step_time, first_sample)

    def evaluate(self, split: str) -> float | None:
        loss = self.evaluator.evaluate(split, self.progress.iteration, on_batch=lambda: self.callbacks.heartbeat(self))
        self.callbacks.post_eval(self, split, loss)
        return loss

    def validate(self) -> None:
        """The validation split; a new best is saved and marked with --save-best."""
        self.checkpointer.after_eval(self.evaluate("valid"))
        self.callbacks.heartbeat(self)

    def save(self, final: bool = False) -> None:
        tag = self.checkpointer.save(final=final)
        if tag is not None:
            self.callbacks.post_checkpoint_saved(self, tag)
        if not final:
            self.callbacks.heartbeat(self)

    def rollback(self) -> None:
        self.checkpointer.rollback(list(self.guard.offending), self.cfg.resilience.spike_max_rollbacks, self.metrics,
                                   self.derived.global_batch_size)
        self.nan_guard.consecutive = 0

    def bad_steps(self) -> int:
        """How many bad steps in a row the guards are counting now (NaN/inf losses, loss spikes)."""
        return max(self.nan_guard.consecutive, self.guard.consecutive if self.guard is not None else 0)

    def _announce_phase(self) -> None:
        """One console line at the start and before the first step of each data-mixing phase: the phase, the
        blend weights in force and the sequence length (megaclm.training.batch)."""
        phase = self.data.curriculum.phase_at(self.progress.iteration)
        if phase != self._shown_phase and self.pstate.rank == 0:
            log.info(self.data.phase_line(self.progress.iteration))
        self._shown_phase = phase

    @property
    def epoch(self) -> float | None:
        """Epochs of training data consumed so far (fractional; None with --mock-data)."""
        return self.data.epoch(self.progress.consumed_samples)
