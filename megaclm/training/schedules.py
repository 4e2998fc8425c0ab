"""Learning-rate schedules as closed forms of (iteration, consumed tokens).

The lr is a pure function of the progress counters, so it needs no state of its own in a
checkpoint: restoring iteration and consumed tokens restores the lr exactly. Formulas follow
Megatron-LM's OptimizerParamScheduler (warmup from 0, then decay from lr to min_lr):

    warmup      lr = max_lr * x / W                                     for x <= W
    constant    lr = max_lr
    linear      lr = min + (max - min) * (1 - r)                        r = (x - W) / (D - W)
    cosine      lr = min + (max - min) * (1 + cos(pi r)) / 2
    inv-sqrt    lr = max(min, max_lr * sqrt(max(W, 1)) / sqrt(max(x, 1)))
    WSD         lr = max_lr until x = D - S, then over the last S units with q = (x - (D - S)) / S:
                  linear 1 - q; cosine (1 + cos(pi q)) / 2; minus_sqrt 1 - sqrt(q); exponential 2 * 0.5**q - 1
    x > D       lr = min_lr

x counts iterations or tokens (`unit`): tokens when any of the token flags is set, which is what a
sequence-length curriculum wants (early steps then count for fewer tokens).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megaclm.config.optimizer import OptimizerConfig
from megaclm.config.scheduler import SchedulerConfig


@dataclass(frozen=True)
class LRSchedule:
    style: str
    max_lr: float
    min_lr: float
    unit: str  # "iters" or "tokens"
    warmup: float
    decay: float
    wsd_style: str = "linear"
    wsd_decay: float = 0.0
    decoupled_max_lr: float | None = None  # --decoupled-lr: the embedding and output layer's peak and floor
    decoupled_min_lr: float | None = None

    def decoupled_lr(self, iteration: int, consumed_tokens: int) -> float:
        """The lr of the param groups marked `decoupled_lr` (the same shape between other bounds)."""
        if self.decoupled_max_lr is None:
            return self.lr(iteration, consumed_tokens)
        return dataclasses.replace(self, max_lr=self.decoupled_max_lr, min_lr=self.decoupled_min_lr,
                                   decoupled_max_lr=None).lr(iteration, consumed_tokens)

    def lr(self, iteration: int, consumed_tokens: int) -> float:
        x = float(consumed_tokens if self.unit == "tokens" else iteration)
        if self.warmup > 0 and x <= self.warmup:
            return self.max_lr * x / self.warmup
        if self.style == "constant":
            return self.max_lr
        if self.style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(self.warmup, 1.0)) / math.sqrt(max(x, 1.0)))
        if x > self.decay:
            return self.min_lr
        span = self.max_lr - self.min_lr
        if self.style == "WSD":
            stable_end = self.decay - self.wsd_decay
            if x <= stable_end:
                return self.max_lr
            q = (x - stable_end) / self.wsd_decay
            coeff = {"linear": 1.0 - q,
                     "cosine": 0.5 * (math.cos(math.pi * q) + 1.0),
                     "minus_sqrt": 1.0 - math.sqrt(q),
                     "exponential": 2.0 * 0.5 ** q - 1.0}[self.wsd_style]
            return self.min_lr + span * coeff
        r = (x - self.warmup) / max(self.decay - self.warmup, 1e-12)
        coeff = 1.0 - r if self.style == "linear" else 0.5 * (math.cos(math.pi * r) + 1.0)
        return self.min_lr + span * coeff

    def state_dict(self) -> dict:
        return dict(self.__dict__)


def build_schedule(opt: OptimizerConfig, sched: SchedulerConfig, train_iters: int, tokens_per_step: int,
                   train_tokens: int | None = None, global_batch_size: int = 1) -> LRSchedule:
    """Resolve the config's lengths (SchedulerConfig.lengths), then the warmup fraction of the decay and WSD's
    default final decay (10% of it)."""
    unit, warmup, decay, wsd = sched.lengths(train_iters, tokens_per_step, train_tokens, global_batch_size)
    if sched.lr_warmup_fraction is not None:
        warmup = sched.lr_warmup_fraction * decay
    if wsd is None:
        wsd = 0.1 * decay
    return LRSchedule(style=sched.lr_decay_style, max_lr=opt.lr, min_lr=opt.min_lr, unit=unit,
                      warmup=float(warmup), decay=float(decay), wsd_style=sched.lr_wsd_decay_style,
                      wsd_decay=float(max(wsd, 1e-12)), decoupled_max_lr=opt.decoupled_lr,
                      decoupled_min_lr=opt.min_lr if opt.decoupled_min_lr is None else opt.decoupled_min_lr)
