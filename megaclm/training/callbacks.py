"""Callbacks: the fixed points at which the training loop (megaclm.training.loop) asks others, and the
guards built on them.

    class Callback:                          # override what you need; every hook does nothing by default
        train_start(trainer)                 before the first step
        pre_step(trainer)                    before a step reads its batches
        post_step(trainer, result)           after a step (a StepResult): None, or ROLLBACK to reload the last
                                             checkpoint and pass over the offending batches
        heartbeat(trainer)                   after every step, evaluation batch, save and rollback
        post_eval(trainer, split, loss)      after an evaluation (loss None: no such split, or interrupted)
        post_checkpoint_saved(trainer, tag)  after a save started (with --async-save it completes later)
        checkpoint_files_written(tag)        after this rank wrote its checkpoint files, before the checkpoint
                                             is complete and `latest` (with --async-save: in the writer thread)
        should_stop(trainer)                 after the step's evaluation and save: a reason to save and stop
                                             (exit status 76), or None
        train_end(trainer)                   last, also when training raised

What post_step and should_stop return must be the same on every rank (decide on all-reduced values, as
the built-in ones do), or the ranks part ways. The built-in callbacks, in the order they run: the
loss-spike guard (--spike-zscore), the NaN/inf guard (--max-consecutive-nan-steps), the hang watchdog
(--hang-timeout-s), the step profiler (--profile, on the ranks --profile-ranks), the stop conditions (a
signal, --exit-duration-in-mins, --exit-interval); then the user's, `--callbacks pkg.module:factory[=ARG]`:
`factory()` or `factory("ARG")` returns a Callback.
"""
from __future__ import annotations

import importlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megaclm.checkpoint.async_save import BUSY
from megaclm.config import MegaclmConfig
from megaclm.config.logging import LoggingConfig
from megaclm.config.resilience import ResilienceConfig
from megaclm.config.training import TrainingConfig
from megaclm.logging import get_logger
from megaclm.training.progress import TrainingDiverged
from megaclm.training.spike import SpikeGuard
from megaclm.training.watchdog import HangWatchdog
from megaclm.utils import signals
from megaclm.utils.errors import UserError

log = get_logger("megaclm.train")

ROLLBACK = "rollback"


@dataclass
class StepResult:
    """One optimizer step, as post_step sees it (the progress has moved past it already)."""

    loss: float  # the global batch's per-token loss, averaged over data-parallel ranks; NaN/inf: skipped
    spike: bool  # the spike guard refused its update
    lr: float
    seq_length: int
    tokens: int  # global batch x seq_length
    time_s: float  # this rank's wall time of the step
    first_sample: int  # the data position the step read from


class Callback:
    def train_start(self, trainer: Any) -> None: ...
    def pre_step(self, trainer: Any) -> None: ...
    def post_step(self, trainer: Any, result: StepResult) -> str | None: ...
    def heartbeat(self, trainer: Any) -> None: ...
    def post_eval(self, trainer: Any, split: str, loss: float | None) -> None: ...
    def post_checkpoint_saved(self, trainer: Any, tag: str) -> None: ...
    def checkpoint_files_written(self, tag: str) -> None: ...
    def should_stop(self, trainer: Any) -> str | None: ...
    def train_end(self, trainer: Any) -> None: ...


class Callbacks:
    """Calls every callback's hook, in order."""

    def __init__(self, callbacks: list):
        self.callbacks = list(callbacks)

    def _call(self, hook: str, *args) -> list:
        return [getattr(c, hook)(*args) for c in self.callbacks if hasattr(c, hook)]

    def train_start(self, trainer: Any) -> None:
        self._call("train_start", trainer)

    def pre_step(self, trainer: Any) -> None:
        self._call("pre_step", trainer)

    def post_step(self, trainer: Any, result: StepResult) -> str | None:
        answers = self._call("post_step", trainer, result)
        wrong = [a for a in answers if a not in (None, ROLLBACK)]
        if wrong:
            raise ValueError(f"a callback's post_step returned {wrong[0]!r}; return None or {ROLLBACK!r}")
        return ROLLBACK if ROLLBACK in answers else None

    def heartbeat(self, trainer: Any) -> None:
        self._call("heartbeat", trainer)

    def post_eval(self, trainer: Any, split: str, loss: float | None) -> None:
        self._call("post_eval", trainer, split, loss)

    def post_checkpoint_saved(self, trainer: Any, tag: str) -> None:
        self._call("post_checkpoint_saved", trainer, tag)

    def checkpoint_files_written(self, tag: str) -> None:
        self._call("checkpoint_files_written", tag)

    def should_stop(self, trainer: Any) -> str | None:
        reasons = self._call("should_stop", trainer)  # every one: the built-in stop conditions are collective
        return next((r for r in reasons if r is not None), None)

    def train_end(self, trainer: Any) -> None:
        self._call("train_end", trainer)


def load_callbacks(specs: list[str]) -> list:
    """`pkg.module:factory` or `pkg.module:factory=ARG` -> factory() or factory("ARG"), each a callback."""
    made = []
    for spec in specs:
        target, has_arg, arg = spec.partition("=")
        module_name, _, name = target.partition(":")
        if not module_name or not name:
            raise UserError(f"--callbacks {spec!r}: write pkg.module:factory or pkg.module:factory=ARG")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"--callbacks {spec!r}: cannot import {module_name} ({e}); put its directory on "
                            "PYTHONPATH") from None
        factory = getattr(module, name, None)
        if not callable(factory):
            raise UserError(f"--callbacks {spec!r}: {module_name} has no callable {name}")
        made.append(factory(arg) if has_arg else factory())
    return made


def stop_agreed(device: Any) -> str | None:
    """Collective: why to stop if any rank was asked to (megaclm.utils.signals), else None; every rank gets
    the same answer."""
    reason = signals.stop_reason()
    flag = torch.tensor([float(reason is not None)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (reason or "another rank was asked to stop") if flag.item() else None


class SpikeCallback(Callback):
    """The loss-spike guard's bookkeeping (megaclm.training.spike); the train step asks it before the update."""

    def __init__(self, guard: SpikeGuard, resilience: ResilienceConfig, global_batch_size: int):
        self.guard, self.r, self.gbs = guard, resilience, global_batch_size

    def post_step(self, trainer: Any, result: StepResult) -> str | None:
        g, p = self.guard, trainer.progress
        g.record(result.loss, result.spike, p.iteration, result.first_sample)
        if not result.spike:
            return None
        p.skipped_steps += 1
        last = result.first_sample + self.gbs - 1
        log.warning(f"iteration {p.iteration}: loss {result.loss:.4f} is {g.offending[-1]['z']:.1f} standard "
                    f"deviations above the last {g.window} (--spike-zscore {g.zscore:g}); update skipped "
                    f"({g.consecutive} in a row; samples {result.first_sample}..{last})")
        if self.r.spike_action == "rollback" and g.consecutive >= self.r.spike_rollback_after:
            return ROLLBACK
        return None


class NanGuard(Callback):
    """Counts non-finite losses (their steps were skipped by the optimizer); too many in a row stop the run."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def post_step(self, trainer: Any, result: StepResult) -> None:
        if result.spike:
            return  # the spike guard's
        p = trainer.progress
        if math.isfinite(result.loss):
            self.consecutive = 0
            return
        p.skipped_steps += 1
        self.consecutive += 1
        log.warning(f"iteration {p.iteration}: loss is {result.loss}; step skipped "
                    f"({self.consecutive} in a row, {p.skipped_steps} in total)")
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive iterations (up to {p.iteration}) had a NaN/inf "
                f"loss (--max-consecutive-nan-steps {self.max_consecutive}); stopping. Resume "
                f"from the last healthy checkpoint, {trainer.checkpointer.last_healthy()}, with a lower --lr, more "
                "warmup or --clip-grad")


class WatchdogCallback(Callback):
    """The hang watchdog (megaclm.training.watchdog) hears a beat at every heartbeat."""

    def __init__(self, timeout_s: float, save_dir: str | None, rank: int):
        self.timeout_s, self.save_dir, self.rank = timeout_s, save_dir, rank
        self.watchdog: HangWatchdog | None = None

    def train_start(self, trainer: Any) -> None:
        self.watchdog = HangWatchdog(self.timeout_s, os.path.join(self.save_dir, "hang") if self.save_dir else None,
                                     self.rank)

    def heartbeat(self, trainer: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(trainer.progress.iteration)

    def train_end(self, trainer: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.close()


class StopConditions(Callback):
    """A stop request (signal, launcher gone; megaclm.utils.signals), --exit-duration-in-mins, --exit-interval.
    The request, the clock and the asynchronous checkpoint writer's state are agreed on by all ranks in one
    all-reduce per step, so every rank stops at the same iteration and `latest` moves once every rank's
    background write is done."""

    def __init__(self, training: TrainingConfig):
        self.t = training

    def should_stop(self, trainer: Any) -> str | None:
        t, writer = self.t, trainer.checkpointer.writer
        elapsed_min = (time.time() - trainer.start_time) / 60
        writing = writer is not None and writer.pending
        requested = signals.stop_reason()
        flags = torch.tensor([float(requested is not None),
                              float(t.exit_duration_in_mins is not None and elapsed_min > t.exit_duration_in_mins),
                              float(writer.status()) if writing else 0.0], device=trainer.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, over_time, status = flags.tolist()  # one host transfer
        if writing and int(status) != BUSY:  # every rank's asynchronous write is done: `latest` may move
            writer.finish(int(status))
        if stop:
            return requested or "another rank was asked to stop"
        if over_time:
            return f"--exit-duration-in-mins {t.exit_duration_in_mins}"
        if t.exit_interval and trainer.progress.iteration % t.exit_interval == 0:
            return f"--exit-interval {t.exit_interval}"
        return None


class Profiler(Callback):
    """--profile (Megatron-LM's flags): the steps after iteration --profile-step-start up to --profile-step-end,
    on this rank. With --use-pytorch-profiler, torch.profiler (CPU, and CUDA when present) writes one trace,
    `<dir>/rank<R>.iter<A>-<B>.pt.trace.json` (chrome://tracing, Perfetto, TensorBoard's profiler plugin), and
    logs a table of the costliest ops; without it, the CUDA profiler range Nsight Systems captures with
    `nsys profile --capture-range=cudaProfilerApi`, with NVTX ranges for the ops. Each profiled step is one
    `iteration N` range. The range stops after its last step's post_step (evaluation and saves stay out of it),
    or at train_end if the run stops inside it. Only the chosen ranks get this callback: off, it costs nothing."""

    def __init__(self, logging_cfg: LoggingConfig, rank: int, out_dir: str):
        self.first, self.last = logging_cfg.profile_step_start + 1, logging_cfg.profile_step_end
        self.torch_profiler, self.rank, self.out_dir = logging_cfg.use_pytorch_profiler, rank, out_dir
        self.session: Any = None  # torch.profiler.profile, or emit_nvtx inside cudaProfilerStart/Stop
        self.step_range: Any = None  # the running step's `iteration N` range
        self.done = False  # once: a rollback to before the range does not profile (and overwrite) it again

    @classmethod
    def for_rank(cls, cfg: MegaclmConfig, rank: int) -> Profiler | None:
        """This rank's profiler, or None (no --profile, or not one of --profile-ranks). The traces go to
        --profile-dir, default <save>/profile (./profile without --save)."""
        lg = cfg.logging
        if not lg.profile or rank not in lg.profile_ranks:
            return None
        return cls(lg, rank, lg.profile_dir or os.path.join(cfg.checkpoint.save or ".", "profile"))

    def train_start(self, trainer: Any) -> None:
        if trainer.progress.iteration >= self.first:
            log.warning(f"rank {self.rank}: --profile: iterations {self.first}-{self.last} are before this run's "
                        f"first step ({trainer.progress.iteration + 1}); nothing is profiled")

    def pre_step(self, trainer: Any) -> None:
        step = trainer.progress.iteration + 1
        if self.session is None and step == self.first and not self.done:
            self._start()
        if self.session is not None:
            self.step_range = torch.profiler.record_function(f"iteration {step}")
            self.step_range.__enter__()

    def post_step(self, trainer: Any, result: StepResult) -> None:
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.session is not None and trainer.progress.iteration >= self.last:
            self._stop(trainer.progress.iteration)

    def train_end(self, trainer: Any) -> None:
        if self.step_range is not None:  # a step raised
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.session is not None:  # stopped (or failed) inside the range: keep what was profiled
            self._stop(trainer.progress.iteration)

    def _start(self) -> None:
        if self.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.session = torch.profiler.profile(activities=activities, record_shapes=True)
            self.session.__enter__()
        else:
            torch.cuda.cudart().cudaProfilerStart()
            self.session = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.session.__enter__()
        log.info(f"rank {self.rank}: --profile: profiling iterations {self.first}-{self.last}")

    def _stop(self, last: int) -> None:
        session, self.session, self.done = self.session, None, True
        session.__exit__(None, None, None)
        if not self.torch_profiler:
            torch.cuda.cudart().cudaProfilerStop()
            log.info(f"rank {self.rank}: --profile: the Nsight Systems range ended after iteration {last}")
            return
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"rank{self.rank}.iter{self.first}-{last}.pt.trace.json")
        session.export_chrome_trace(path + ".tmp")  # whole or not at all: a reader never sees half a trace
        os.replace(path + ".tmp", path)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        log.info(f"rank {self.rank}: --profile: iterations {self.first}-{last} traced to {path}; the costliest "
                 f"ops:\n{session.key_averages().table(sort_by=sort, row_limit=10)}")
