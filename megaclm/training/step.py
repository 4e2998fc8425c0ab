"""One optimizer step and one evaluation, over the DeepSpeed engine.

TrainStep: read the global batch's micro-batches and scale their loss masks for a per-token loss over
the whole global batch (megaclm.training.loss: one all-reduce of the loss-token count); run them
(accumulation inside: engine.backward/step per micro-batch, or PipelineEngine.train_batch); all-reduce
the loss over data-parallel ranks (the mean over micro-batches and ranks of the scaled sums is the
per-token loss). With the loss-spike guard the step's loss is judged before the last backward; a spike's
update is refused by making that loss non-finite (every optimizer here then skips the step).

Evaluator: `--eval-iters` batches of a split, weighted per loss token; a stop request is checked before
each batch (one all-reduce) and abandons the evaluation.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from megaclm.config.training import TrainingConfig
from megaclm.logging import get_logger
from megaclm.model.gpt import MOE_STATS, masked_loss_sum
from megaclm.parallel.state import ParallelState
from megaclm.training.batch import BatchSource
from megaclm.training.callbacks import stop_agreed
from megaclm.training.loss import normalise_loss_masks
from megaclm.training.metrics import MetricsLogger
from megaclm.training.progress import Progress
from megaclm.training.schedules import LRSchedule
from megaclm.training.spike import SpikeGuard

log = get_logger("megaclm.train")


class TrainStep:
    def __init__(self, engine: Any, pstate: ParallelState, data: BatchSource, grad_accum_steps: int, *, moe: bool,
                 guard: SpikeGuard | None, device: Any):
        self.engine, self.pstate, self.data, self.accum = engine, pstate, data, grad_accum_steps
        self.pipeline = pstate.pp_size > 1
        self.moe, self.guard, self.device = moe, guard, device
        self.last_moe: list[float] | None = None  # the last step's MOE_STATS, data-parallel mean
        self._pipe_seq_length = None
        # Fault injection (a callback's pre_step may set it): the next step's micro-batch losses are multiplied
        # by this (NaN: a non-finite step; 10: a spike). Reset after every step.
        self.loss_factor = 1.0

    def set_lr(self, schedule: LRSchedule, progress: Progress) -> float:
        lr = schedule.lr(progress.iteration, progress.consumed_tokens)
        decoupled = schedule.decoupled_lr(progress.iteration, progress.consumed_tokens)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = decoupled if group.get("decoupled_lr") else lr
        return lr

    def micro_loss(self, batch: dict) -> torch.Tensor:
        """sum(loss x mask) with the mask scaled by normalise_loss_masks: the engines' averaging makes the
        step's sum of these the per-token loss of the global batch (megaclm.training.loss)."""
        losses = self.engine(batch["tokens"], position_ids=batch["position_ids"],
                             document_ids=batch.get("document_ids"), labels=batch["labels"])  # (B, T) fp32
        return masked_loss_sum(losses, batch["loss_mask"])

    def normalised(self, micro: Iterator) -> tuple[list, torch.Tensor]:
        """The global batch's micro-batches, loss masks scaled for the per-token loss, and its loss-token count."""
        return normalise_loss_masks(list(micro), self.pstate, self.accum, self.pipeline)

    def dp_mean(self, value: torch.Tensor) -> float | list[float]:
        """Mean over dp of the sum over seq (the parts of one micro-batch's loss)."""
        value = value.detach().float().clone()
        if self.pstate.dp_size * self.pstate.cp_size > 1:
            dist.all_reduce(value, group=self.pstate.cp_dp_group)
            value /= self.pstate.dp_size
        return value.item() if value.dim() == 0 else value.tolist()

    def pipe_shape(self, seq_length: int) -> None:
        """The pipeline engine reuses its p2p buffers: tell it when a curriculum changes the length."""
        if seq_length != self._pipe_seq_length:
            self.engine.reset_activation_shape()
            self._pipe_seq_length = seq_length

    def __call__(self, consumed_samples: int, seq_length: int) -> tuple[float, bool]:
        """One global batch: (its loss, averaged over micro-batches and dp ranks; whether the spike guard
        refused its update)."""
        factor, self.loss_factor = self.loss_factor, 1.0
        micro = self.data.micro_batches(consumed_samples, seq_length)
        if not self.pipeline or self.pstate.is_first_stage or self.pstate.is_last_stage:  # middle stages read none
            micro, _ = self.normalised(micro)
        if self.pipeline:
            if factor != 1.0:
                raise ValueError("fault injection (TrainStep.loss_factor) is not supported with pipeline parallelism")
            return self._pipeline_step(micro, seq_length)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        moe = torch.zeros(len(MOE_STATS), dtype=torch.float32, device=self.device)
        spike, step_loss = False, None
        for a, batch in enumerate(micro):
            loss = self.micro_loss(batch) * factor
            if a == self.accum - 1 and self.guard is not None:
                # The guard decides before the last backward, on the dp-averaged loss: the same on every rank.
                step_loss = self.dp_mean((total + loss.detach().float()) / self.accum)
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
            with_router, *self.last_moe = self.dp_mean(torch.cat([total[None], moe]) / self.accum)
        if self.guard is not None:
            return step_loss, spike
        if self.moe:
            return with_router - self.last_moe[0], False
        return self.dp_mean(total / self.accum), False

    def _pipeline_step(self, micro: Iterator, seq_length: int) -> tuple[float, bool]:
        self.pipe_shape(seq_length)
        # DeepSpeed averages over micro-batches and dp x seq: the per-token loss (megaclm.training.loss)
        loss = self.engine.train_batch(data_iter=iter(micro))
        if not self.moe:
            return loss.item(), False
        # The router statistics, aggregated alike by DeepSpeed (GPTPipelineModule.get_additional_losses);
        # the logged loss is the LM loss alone, as above.
        stats = self.engine.get_additional_losses()
        with_router, *self.last_moe = torch.stack([loss.float(), *(stats[k].float() for k in MOE_STATS)]).tolist()
        return with_router - self.last_moe[0], False


class Evaluator:
    """The evaluation splits, every --eval-interval iterations and at the end."""

    def __init__(self, step: TrainStep, data: BatchSource, training: TrainingConfig, seq_length: int,
                 metrics: MetricsLogger):
        self.step, self.data, self.t, self.seq, self.metrics = step, data, training, seq_length, metrics
        self.interrupted: str | None = None  # why the last evaluation stopped early (a stop request)

    def due(self, iteration: int) -> bool:
        return iteration % self.t.eval_interval == 0

    @torch.no_grad()
    def evaluate(self, split: str, iteration: int, on_batch: Callable[[], None]) -> float | None:
        """The split's per-token loss over --eval-iters batches; None without the split or when interrupted.
        `on_batch` runs after each batch (the hang watchdog's beat)."""
        if self.t.eval_iters == 0 or not self.data.has_split(split):
            return None
        s, engine = self.step, self.step.engine
        engine.eval()
        weighted, tokens = 0.0, 0.0  # per token over every evaluated batch: sum of (batch loss x its tokens)
        for i in range(self.t.eval_iters):
            # A long evaluation must not outlast the scheduler's grace period before the final save.
            self.interrupted = stop_agreed(s.device)
            if self.interrupted is not None:
                log.info(f"iteration {iteration}: {split} evaluation interrupted after {i} of "
                         f"{self.t.eval_iters} batches ({self.interrupted})")
                engine.train()
                return None
            # every stage reads the (small) evaluation batch: all ranks need its count to weight it alike
            micro, count = s.normalised(self.data.eval_micro_batches(split, i, self.seq))
            if s.pipeline:
                s.pipe_shape(self.seq)
                loss = engine.eval_batch(data_iter=iter(micro)).item()
            else:
                total = sum(s.micro_loss(batch) for batch in micro)
                loss = s.dp_mean(total / s.accum)
            weighted, tokens = weighted + loss * count.item(), tokens + count.item()
            on_batch()  # per batch: the watchdog's limit need not cover a whole evaluation
        engine.train()
        loss = weighted / max(tokens, 1.0)
        self.metrics.evaluation(iteration, "val" if split == "valid" else split, loss)
        return loss
