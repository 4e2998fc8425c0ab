"""`scheduler:` section: learning-rate warmup and decay (Megatron-LM / Megatron-DeepSpeed flag names).

Warmup and decay are each measured in iterations, samples (Megatron-LM's `--lr-*-samples`: a sample
count is iterations times the global batch) or tokens (tokens win, then samples), so a sequence-length
curriculum, where early steps hold fewer tokens, can schedule by tokens.
The closed forms live in `megaclm.training.schedules`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

DECAY_STYLES = ["constant", "linear", "cosine", "inverse-square-root", "WSD"]
WSD_DECAY_STYLES = ["linear", "cosine", "minus_sqrt", "exponential"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule: linear warmup, then the decay style, floored at optimizer.min_lr."""

    lr_decay_style: str = field(default="cosine", metadata={
        "help": "Decay after warmup: constant, linear, cosine, inverse-square-root, or WSD "
                "(warmup-stable-decay: constant, then --lr-wsd-decay-style over the last --lr-wsd-decay-iters).",
        "choices": DECAY_STYLES})
    lr_warmup_iters: int = field(default=0, metadata={"help": "Linear warmup length in iterations."})
    lr_warmup_fraction: float | None = field(default=None, metadata={
        "help": "Warmup as a fraction of the decay length (of --lr-decay-iters or --lr-decay-tokens)."})
    lr_warmup_tokens: int | None = field(default=None, metadata={
        "help": "Warmup length in tokens (overrides --lr-warmup-iters)."})
    lr_warmup_samples: int | None = field(default=None, metadata={
        "help": "Warmup length in samples (overrides --lr-warmup-iters; --lr-warmup-tokens wins over it)."})
    lr_decay_iters: int | None = field(default=None, metadata={
        "help": "Iterations over which the lr decays (warmup included); default: the training length."})
    lr_decay_tokens: int | None = field(default=None, metadata={
        "help": "Tokens over which the lr decays (warmup included); overrides --lr-decay-iters."})
    lr_decay_samples: int | None = field(default=None, metadata={
        "help": "Samples over which the lr decays (warmup included); overrides --lr-decay-iters."})
    lr_wsd_decay_style: str = field(default="linear", metadata={
        "help": "WSD's final decay shape: linear, cosine, minus_sqrt (1 - sqrt), or exponential.",
        "choices": WSD_DECAY_STYLES})
    lr_wsd_decay_iters: int | None = field(default=None, metadata={
        "help": "WSD: length of the final decay in iterations (default: 10% of the decay length)."})
    lr_wsd_decay_tokens: int | None = field(default=None, metadata={
        "help": "WSD: length of the final decay in tokens (overrides --lr-wsd-decay-iters)."})

    def __post_init__(self):
        for name in ("lr_warmup_iters", "lr_warmup_tokens", "lr_warmup_samples", "lr_decay_iters",
                     "lr_decay_tokens", "lr_decay_samples",
                     "lr_wsd_decay_iters", "lr_wsd_decay_tokens"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"scheduler.{name}={v} must be >= 0")
        if self.lr_warmup_fraction is not None:
            if not 0 <= self.lr_warmup_fraction < 1:
                raise UserError(f"scheduler.lr_warmup_fraction={self.lr_warmup_fraction} must be in [0, 1)")
            if self.lr_warmup_iters or self.lr_warmup_tokens or self.lr_warmup_samples:
                raise UserError("scheduler.lr_warmup_fraction and scheduler.lr_warmup_iters/tokens/samples are "
                                "exclusive; pass only one of --lr-warmup-fraction, --lr-warmup-iters, "
                                "--lr-warmup-tokens, --lr-warmup-samples")
        if self.lr_decay_style != "WSD" and (self.lr_wsd_decay_iters or self.lr_wsd_decay_tokens):
            raise UserError(f"scheduler.lr_wsd_decay_iters/tokens need scheduler.lr_decay_style=WSD, "
                            f"got {self.lr_decay_style!r}; pass --lr-decay-style WSD")
