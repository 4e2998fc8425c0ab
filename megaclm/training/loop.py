"""The training loop: step, log, evaluate, checkpoint, and stop cleanly.

Per iteration: set the lr from (iteration, consumed tokens); read the global batch's micro-batches and
scale their loss masks for a per-token loss over the whole global batch (megaclm.training.loss: one
all-reduce of the loss-token count); run them (accumulation inside: engine.backward/step per
micro-batch, or PipelineEngine.train_batch); all-reduce the loss over data-parallel ranks (the
mean over micro-batches and ranks of the scaled sums is the per-token loss); count a non-finite loss as a skipped step (DeepSpeed's optimizers skip a
step with non-finite gradients, see megaclm.training.engine) and stop after
`--max-consecutive-nan-steps` in a row; log; evaluate every `--eval-interval`; save every
`--save-interval` (with `--async-save` in the background: the per-iteration all-reduce below also
agrees on when every rank's write is done, and only then does `latest` move). Stops at the end of training, at `--exit-interval`, after
`--exit-duration-in-mins`, on SIGTERM/SIGUSR1 (SLURM preemption) or when the `deepspeed` launcher is
gone (megaclm.utils.signals records both from process start), saving first and returning why (exit
status 76). Stop requests and the clock are agreed on by all ranks with one all-reduce per iteration,
so every rank stops at the same iteration; an evaluation checks for a stop request before each of its
batches (one all-reduce each) and is abandoned on one.

No checkpoint is written while a guard counts bad steps (a NaN/inf loss, a loss spike): a periodic
save waits for the next healthy step, the final or stop save is skipped (after the last step the
run exits with status 1: its end state was not saved) and nothing is pruned, so `latest` and the newest healthy checkpoint survive a
divergence; before every save the weights themselves must be finite (DeepSpeed's bf16 optimizer
without ZeRO applies non-finite gradients on the CPU).

Optional guards: the loss-spike guard (`--spike-zscore`, megaclm.training.spike) judges each step's
loss before its update and may skip it or roll the run back; the hang watchdog (`--hang-timeout-s`,
megaclm.training.watchdog; on by default) hears a beat after every step, evaluation batch and save. Every log line
all-gathers the ranks' step times (`rank_step_time`, `slowest_rank`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from megaclm.checkpoint.async_save import BUSY, AsyncCheckpointWriter
from megaclm.checkpoint.deepspeed_ckpt import load_checkpoint, mark_best, restore_rng, run_layout, save_checkpoint
from megaclm.checkpoint.layout import read_latest, tag_for
from megaclm.logging import get_logger
from megaclm.model.gpt import MOE_STATS
from megaclm.training.batch import BatchSource
from megaclm.training.loss import normalise_loss_masks
from megaclm.training.metrics import MetricsLogger, memory_gb
from megaclm.training.schedules import LRSchedule
from megaclm.training.spike import SpikeGuard
from megaclm.training.watchdog import HangWatchdog
from megaclm.utils import signals

log = get_logger("megaclm.train")
POISON_SCALE = 10.0  # MEGACLM_TEST_POISON_SAMPLES


def _new_window() -> dict:
    """Sums over the steps since the last log line."""
    return {"loss": [], "time": 0.0, "tokens": 0, "flops": 0.0, "steps": 0, "moe": []}


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses, or non-finite weights at a save."""


@dataclass
class Progress:
    """megaclm's training progress; saved in every checkpoint's client state."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None
    rollbacks: int = 0  # loss-spike guard rollbacks so far (megaclm.training.spike)

    def state_dict(self) -> dict:
        return asdict(self)


def stop_agreed(device: Any) -> str | None:
    """Collective: why to stop if any rank was asked to (megaclm.utils.signals), else None; every rank gets
    the same answer."""
    reason = signals.stop_reason()
    flag = torch.tensor([float(reason is not None)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (reason or "another rank was asked to stop") if flag.item() else None


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
        self.save_deferred = False  # a periodic save fell in a streak of bad steps: save at the next healthy one
        self.end_unsaved = False  # the final/stop save was skipped (the run ended in a streak of bad steps)
        self.writer = AsyncCheckpointWriter() if cfg.checkpoint.async_save else None
        self._pipe_seq_length = None
        # Test hook: iterations (1-based) whose loss is replaced by NaN, to exercise the skip logic.
        self.inject_nan = {int(x) for x in os.environ.get("MEGACLM_TEST_NAN_ITERS", "").split(",") if x}
        self.moe = cfg.model.num_experts is not None
        self.last_moe: list[float] | None = None  # the last step's MOE_STATS, data-parallel mean
        # Test hook: rank MEGACLM_TEST_SLEEP_RANK (default 0) sleeps for an hour before iteration
        # MEGACLM_TEST_SLEEP_AT_ITER (1-based), a hang for the watchdog (--hang-timeout-s) to catch.
        self.sleep_at = int(os.environ.get("MEGACLM_TEST_SLEEP_AT_ITER", "0"))
        self.sleep_rank = int(os.environ.get("MEGACLM_TEST_SLEEP_RANK", "0"))
        self.watchdog: HangWatchdog | None = None
        self.eval_interrupted: str | None = None  # why the last evaluation stopped early (a stop request)
        t = cfg.training
        self.guard = SpikeGuard(t.spike_zscore, t.spike_window) if t.spike_zscore is not None else None
        # Test hook: a "poisoned" global batch - the one starting at one of these samples - has its loss
        # multiplied by POISON_SCALE: a deterministic spike, tied to the data (a replay after a rollback
        # that skipped it never sees it again).
        self.poison = {int(x) for x in os.environ.get("MEGACLM_TEST_POISON_SAMPLES", "").split(",") if x}

    # ---- one step -------------------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        p = self.progress
        lr = self.schedule.lr(p.iteration, p.consumed_tokens)
        decoupled = self.schedule.decoupled_lr(p.iteration, p.consumed_tokens)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = decoupled if group.get("decoupled_lr") else lr
        return lr

    def _micro_loss(self, batch: dict) -> torch.Tensor:
        """sum(loss x mask) with the mask scaled by normalise_loss_masks: the engines' averaging makes the
        step's sum of these the per-token loss of the global batch (megaclm.training.loss)."""
        losses = self.engine(batch["tokens"], position_ids=batch["position_ids"],
                             document_ids=batch.get("document_ids"), labels=batch["labels"])  # (B, T) fp32
        return (losses.float() * batch["loss_mask"]).sum()

    def _normalised(self, micro: Iterator) -> tuple[list, torch.Tensor]:
        """The global batch's micro-batches, loss masks scaled for the per-token loss, and its loss-token count."""
        return normalise_loss_masks(list(micro), self.pstate, self.derived.grad_accum_steps, self.pipeline)

    def _dp_mean(self, value: torch.Tensor) -> float | list[float]:
        """Mean over dp of the sum over seq (the parts of one micro-batch's loss)."""
        value = value.detach().float().clone()
        if self.pstate.dp_size * self.pstate.seq_size > 1:
            dist.all_reduce(value, group=self.pstate.seq_dp_group)
            value /= self.pstate.dp_size
        return value.item() if value.dim() == 0 else value.tolist()

    def _test_hang(self) -> None:
        if self.progress.iteration + 1 == self.sleep_at and self.pstate.rank == self.sleep_rank:
            time.sleep(3600)

    def _beat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.progress.iteration)

    def train_step(self, seq_length: int) -> tuple[float, bool]:
        """One global batch: (its loss, averaged over micro-batches and dp ranks; whether the spike guard
        refused its update)."""
        micro = self.data.micro_batches(self.progress.consumed_samples, seq_length)
        if not self.pipeline or self.pstate.is_first_stage or self.pstate.is_last_stage:  # middle stages read none
            micro, _ = self._normalised(micro)
        nan = (self.progress.iteration + 1) in self.inject_nan
        poison = POISON_SCALE if self.progress.consumed_samples in self.poison else 1.0
        if self.pipeline:
            if nan or poison != 1.0:
                raise ValueError("MEGACLM_TEST_NAN_ITERS/POISON_SAMPLES are not supported with pipeline parallelism")
            self._pipe_shape(seq_length)
            # DeepSpeed averages over micro-batches and dp x seq: the per-token loss (megaclm.training.loss)
            loss = self.engine.train_batch(data_iter=iter(micro))
            if not self.moe:
                return loss.item(), False
            # The router statistics, aggregated alike by DeepSpeed (GPTPipelineModule.get_additional_losses);
            # the logged loss is the LM loss alone, as below.
            stats = self.engine.get_additional_losses()
            with_router, *self.last_moe = torch.stack([loss.float(), *(stats[k].float() for k in MOE_STATS)]).tolist()
            return with_router - self.last_moe[0], False
        accum = self.derived.grad_accum_steps
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        moe = torch.zeros(len(MOE_STATS), dtype=torch.float32, device=self.device)
        spike, step_loss = False, None
        for a, batch in enumerate(micro):
            loss = self._micro_loss(batch) * poison
            if nan:
                loss = loss * float("nan")
            if a == accum - 1 and self.guard is not None:
                # The guard decides before the last backward, on the dp-averaged loss: the same on every rank.
                step_loss = self._dp_mean((total + loss.detach().float()) / accum)
                spike = self.guard.is_spike(step_loss)
                if spike:
                    loss = loss * float("nan")  # non-finite gradients: every optimizer here skips the step
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
            if self.moe:  # what the router losses added to this micro-batch's loss (every loss token carries
                # them: weighted by its scaled mask), and their raw values
                stats = self.engine.module.moe_stats
                weight = batch["loss_mask"].sum()
                moe += torch.stack([stats["router_loss"].float() * weight,
                                    *(stats[k].float() for k in MOE_STATS[1:])]).to(moe.device)
        if spike and self.engine.was_step_applied():
            raise RuntimeError("the spike guard could not skip the update: the optimizer applied a step with "
                               "non-finite gradients")
        if self.moe:  # one all-reduce for the loss and the router statistics; the logged loss is the LM loss alone
            with_router, *self.last_moe = self._dp_mean(torch.cat([total[None], moe]) / accum)
        if self.guard is not None:
            return step_loss, spike
        if self.moe:
            return with_router - self.last_moe[0], False
        return self._dp_mean(total / accum), False

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
        weighted, tokens = 0.0, 0.0  # per token over every evaluated batch: sum of (batch loss x its tokens)
        for i in range(self.cfg.training.eval_iters):
            # A long evaluation must not outlast the scheduler's grace period before the final save.
            self.eval_interrupted = stop_agreed(self.device)
            if self.eval_interrupted is not None:
                log.info(f"iteration {self.progress.iteration}: {split} evaluation interrupted after {i} of "
                         f"{self.cfg.training.eval_iters} batches ({self.eval_interrupted})")
                self.engine.train()
                return None
            # every stage reads the (small) evaluation batch: all ranks need its count to weight it alike
            micro, count = self._normalised(self.data.eval_micro_batches(split, i, seq))
            if self.pipeline:
                self._pipe_shape(seq)
                loss = self.engine.eval_batch(data_iter=iter(micro)).item()
            else:
                total = sum(self._micro_loss(batch) for batch in micro)
                loss = self._dp_mean(total / self.derived.grad_accum_steps)
            weighted, tokens = weighted + loss * count.item(), tokens + count.item()
            self._beat()  # per batch: the watchdog's limit need not cover a whole evaluation
        self.engine.train()
        loss = weighted / max(tokens, 1.0)
        self.metrics.evaluation(self.progress.iteration, "val" if split == "valid" else split, loss)
        return loss

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def bad_steps(self) -> int:
        """How many bad steps in a row the guards are counting now (NaN/inf losses, loss spikes)."""
        return max(self.consecutive_nan, self.guard.consecutive if self.guard is not None else 0)

    def last_healthy(self) -> str:
        """The newest complete checkpoint in --save, for messages (every one megaclm saves is healthy).
        Collective with --async-save (a pending save is finished first): call it on every rank."""
        if self.writer is not None:
            self.writer.wait()
        save = self.cfg.checkpoint.save
        tag = read_latest(save) if save else None
        return os.path.join(save, tag) if tag else "none (no checkpoint saved yet in --save)"

    def _weights_finite(self) -> bool:
        """Whether every rank's weights are finite (its ZeRO-3 partition, else its module parameters)."""
        local = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]
        checks = [torch.isfinite(t).all() for t in local if t.numel()]
        finite = not checks or bool(torch.stack(checks).all())  # one device sync
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def save(self, on_complete: Callable[[], None] | None = None, final: bool = False) -> str | None:
        """Save now (sync), or start an asynchronous save after the previous one finished (--async-save);
        `on_complete` runs on rank 0 once the checkpoint is complete and `latest`. During a streak of bad
        steps nothing is saved: a periodic save is deferred to the next healthy step, a `final` one skipped."""
        c = self.cfg.checkpoint
        if c.save is None or self.last_saved == self.progress.iteration:
            return None
        it, bad = self.progress.iteration, self.bad_steps()
        if bad:
            if final or not self.save_deferred:  # once per deferral, not at every bad step after it
                healthy = self.last_healthy()  # collective with --async-save: every rank asks
                if self.pstate.rank == 0:
                    log.warning(f"iteration {it}: not saving during a streak of bad steps (NaN/inf loss or loss "
                                f"spike; {bad} so far); " + ("the run ends without saving its last steps" if final else
                                              "saving at the next healthy step instead")
                                + f"; the last healthy checkpoint is {healthy}")
            self.save_deferred, self.end_unsaved = not final, final
            return None
        if not self._weights_finite():
            raise TrainingDiverged(f"iteration {it}: the model's weights are not finite; not saving them. Resume from "
                                   f"the last healthy checkpoint, {self.last_healthy()}, with a lower --lr, more "
                                   "warmup or --clip-grad")
        self.save_deferred = False
        if self.writer is not None:
            self.writer.wait()
        client = {"progress": self.progress.state_dict(), "data": self.data.state_dict(),
                  "world_size": self.pstate.world_size, "spike": self.guard.state_dict() if self.guard else None}
        tag = save_checkpoint(self.engine, c.save, self.progress.iteration, client, pstate=self.pstate,
                              config_tree=self.cfg.to_dict(), meta={**self.checkpoint_meta, **self.progress.state_dict(),
                                                               "client": client},
                              total_limit=c.save_total_limit, writer=self.writer, on_complete=on_complete)
        self.last_saved = self.progress.iteration
        return tag

    def _after_eval(self, val_loss: float | None) -> None:
        c = self.cfg.checkpoint
        if val_loss is None or not c.save_best or not math.isfinite(val_loss) or self.bad_steps():
            return  # during bad steps nothing is saved, so nothing can be marked best
        if self.progress.best_val_loss is None or val_loss < self.progress.best_val_loss:
            self.progress.best_val_loss = val_loss
            tag = tag_for(self.progress.iteration)
            if self.save(on_complete=lambda: mark_best(c.save, tag, val_loss)) is None:  # saved already
                if self.writer is not None:
                    self.writer.wait()  # `best` names complete checkpoints only
                mark_best(c.save, tag, val_loss)

    def _report_spike(self, loss: float, first_sample: int) -> None:
        g, last = self.guard, first_sample + self.derived.global_batch_size - 1
        log.warning(f"iteration {self.progress.iteration}: loss {loss:.4f} is {g.offending[-1]['z']:.1f} standard "
                    f"deviations above the last {g.window} (--spike-zscore {g.zscore:g}); update skipped "
                    f"({g.consecutive} in a row; samples {first_sample}..{last})")

    def _rollback(self) -> None:
        """K spikes in a row: reload the last checkpoint and pass over the offending batches from now on."""
        c, t, p = self.cfg.checkpoint, self.cfg.training, self.progress
        offending = list(self.guard.offending)
        if self.writer is not None:
            self.writer.wait()
        tag = read_latest(c.save)
        seen = ", ".join(str(o["iteration"]) for o in offending)
        if tag is None or p.rollbacks >= t.spike_max_rollbacks:
            why = (f"there is no checkpoint in {c.save} to roll back to" if tag is None else
                   f"the run rolled back {p.rollbacks} times already (--spike-max-rollbacks)")
            raise TrainingDiverged(f"{len(offending)} loss spikes in a row (iterations {seen}) and {why}; stopping. "
                                   "Look at their batches with tools/inspect_batch.py --first-sample")
        rollbacks = p.rollbacks + 1
        state = load_checkpoint(self.engine, c.save, tag, layout=run_layout(self.pstate, t.zero_stage))
        for key, value in state["progress"].items():
            setattr(p, key, value)
        p.rollbacks = rollbacks
        self.data.load_state_dict(state["data"])
        self.data.skip_batches([o["first_sample"] for o in offending])
        p.consumed_samples = self.data.consumed_samples
        self.guard.load_state_dict(state["spike"])
        restore_rng(state)
        self.last_saved, self.consecutive_nan = None, 0
        gbs = self.derived.global_batch_size
        skipped = [{"iteration": o["iteration"], "samples": [o["first_sample"], o["first_sample"] + gbs - 1],
                    "loss": o["loss"], "z": o["z"]} for o in offending]
        self.metrics.event({"iteration": p.iteration, "rollback": rollbacks, "rollback_to": tag,
                            "skipped_batches": skipped},
                           f"rollback {rollbacks} to {tag} after loss spikes at iterations {seen}; from now on "
                           "skipping the global batches of samples "
                           + ", ".join(f"{a}..{b}" for a, b in (s["samples"] for s in skipped)))

    # ---- stopping -------------------------------------------------------------------------------------------
    def _should_stop(self) -> str | None:
        t = self.cfg.training
        elapsed_min = (time.time() - self.start_time) / 60
        writing = self.writer is not None and self.writer.pending
        requested = signals.stop_reason()
        flags = torch.tensor([float(requested is not None),
                              float(t.exit_duration_in_mins is not None and elapsed_min > t.exit_duration_in_mins),
                              float(self.writer.status()) if writing else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, over_time, status = flags.tolist()  # one host transfer
        if writing and int(status) != BUSY:  # every rank's asynchronous write is done: `latest` may move
            self.writer.finish(int(status))
        if stop:
            return requested or "another rank was asked to stop"
        if over_time:
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
        signals.install()  # pretrain_gpt.py did at start-up; other callers get the handlers here
        window = _new_window()
        reason = "finished"
        if t.hang_timeout_s:
            save = self.cfg.checkpoint.save
            self.watchdog = HangWatchdog(t.hang_timeout_s, os.path.join(save, "hang") if save else None,
                                         self.pstate.rank)
        shown_phase = None  # the data phase last announced on the console
        try:
            while not self._done():
                shown_phase = self._announce_phase(shown_phase)
                seq = self.data.seq_length_at(self.progress)
                lr = self._set_lr()
                self._test_hang()
                start = time.time()
                loss, spike = self.train_step(seq)
                step_time = time.time() - start
                p = self.progress
                first_sample = p.consumed_samples
                p.iteration += 1
                step_tokens = self.derived.global_batch_size * seq
                p.consumed_tokens += step_tokens
                self.data.advance()
                p.consumed_samples = self.data.consumed_samples  # past any skipped batches
                if self.guard is not None:
                    self.guard.record(loss, spike, p.iteration, first_sample)
                if spike:
                    p.skipped_steps += 1
                    self._report_spike(loss, first_sample)
                elif math.isfinite(loss):
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
                            f"from the last healthy checkpoint, {self.last_healthy()}, with a lower --lr, more warmup "
                            "or --clip-grad")
                window["time"] += step_time
                window["tokens"] += step_tokens
                # FLOPs per step at the step's own length: exact across the seqlen warmup.
                window["flops"] += step_tokens * self.flops_per_token(seq)
                window["steps"] += 1
                if self.last_moe is not None and math.isfinite(loss):
                    window["moe"].append(self.last_moe)
                self.metrics.step(loss if math.isfinite(loss) else None)
                rollback = (spike and t.spike_action == "rollback"
                            and self.guard.consecutive >= t.spike_rollback_after)
                if p.iteration % lg.log_interval == 0 or p.iteration == 1 or rollback:  # 1: the starting loss
                    self._log(lr, window)
                    window = _new_window()
                if rollback:
                    self._rollback()
                    self._beat()
                    continue
                self._beat()
                if p.iteration % t.eval_interval == 0 and not self._done():
                    self._after_eval(self.evaluate("valid"))
                    self._beat()
                interval = self.cfg.checkpoint.save_interval
                if (interval and p.iteration % interval == 0) or self.save_deferred:
                    self.save()
                    self._beat()
                stop = self._should_stop()
                if stop is not None:
                    reason = stop
                    log.info(f"stopping at iteration {p.iteration}: {stop}; saving a checkpoint")
                    break
            if window["steps"]:  # the steps since the last log line: logged, so every trained step is
                self._log(lr, window)
            if reason == "finished":
                self._after_eval(self.evaluate("valid"))
                self.evaluate("test")
                if self.eval_interrupted is not None:  # a requeue resumes here and evaluates again
                    reason = self.eval_interrupted
            self.save(final=True)
            if self.writer is not None:
                self.writer.wait()
        finally:
            if self.watchdog is not None:
                self.watchdog.close()
        return reason

    def _announce_phase(self, shown: int | None) -> int:
        """One console line at the start and before the first step of each data-mixing phase: the phase, the
        blend weights in force and the sequence length (megaclm.training.batch)."""
        phase = self.data.curriculum.phase_at(self.progress.iteration)
        if phase != shown and self.pstate.rank == 0:
            log.info(self.data.phase_line(self.progress.iteration))
        return phase

    @property
    def epoch(self) -> float | None:
        """Epochs of training data consumed so far (fractional; None with --mock-data)."""
        return self.data.epoch(self.progress.consumed_samples)

    def _rank_step_times(self, window: dict) -> list[float]:
        """Every rank's mean step time over the window (one all-gather per log line), to name stragglers."""
        mine = torch.tensor([window["time"] / max(window["steps"], 1)], dtype=torch.float64, device=self.device)
        if not dist.is_initialized() or self.pstate.world_size == 1:
            return [mine.item()]
        gathered = [torch.zeros_like(mine) for _ in range(self.pstate.world_size)]
        dist.all_gather(gathered, mine)
        return [t.item() for t in gathered]

    def _log(self, lr: float, window: dict) -> None:
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
            "loss": sum(window["loss"]) / n if n else None, "lr": lr,
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
