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

    @property
    def by_tokens(self) -> bool:
        return any(v is not None for v in (self.lr_warmup_tokens, self.lr_decay_tokens, self.lr_wsd_decay_tokens))

    def lengths(self, train_iters: int, tokens_per_step: int, train_tokens: int | None,
                global_batch_size: int) -> tuple[str, float, float, float | None]:
        """(unit, warmup, decay, wsd) as given: in tokens when any token length is set, else in iterations (a
        sample count is iterations x the global batch, exact: the batch is constant); decay defaults to the
        whole run. --lr-warmup-fraction and WSD's default length are the schedule's (training.schedules)."""
        if self.by_tokens:
            decay = self.lr_decay_tokens or train_tokens or train_iters * tokens_per_step
            return "tokens", self.lr_warmup_tokens or 0, decay, self.lr_wsd_decay_tokens

        def iters(samples, n):
            return n if samples is None else samples / global_batch_size

        decay = iters(self.lr_decay_samples, self.lr_decay_iters) or train_iters
        return "iters", iters(self.lr_warmup_samples, self.lr_warmup_iters), decay, self.lr_wsd_decay_iters

