"""`resilience:` section: the guards of a long run: NaN/inf losses, loss spikes (skip or roll back), hangs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from megaclm.utils.errors import UserError


@dataclass(frozen=True)
class ResilienceConfig:
    """What the training loop's guards (megaclm.training.callbacks) tolerate before they skip, roll back or stop."""

    former_section: ClassVar[str] = "training"  # a YAML file or stored config may still hold these keys there

    max_consecutive_nan_steps: int = field(default=10, metadata={
        "help": "A step whose loss is NaN/inf is skipped and counted; this many in a row stop the run."})
    spike_zscore: float | None = field(default=None, metadata={
        "help": "Loss-spike guard: a step whose loss is more than this many standard deviations above the mean "
                "of the last --spike-window accepted losses is not applied (megaclm.training.spike). Unset: off."})
    spike_window: int = field(default=50, metadata={"help": "Spike guard: accepted losses in the running window."})
    spike_action: str = field(default="skip", metadata={
        "help": "Spike guard: skip (the step's update is not applied), or rollback (also: after "
                "--spike-rollback-after spikes in a row, reload the last checkpoint and skip those batches).",
        "choices": ["skip", "rollback"]})
    spike_rollback_after: int = field(default=3, metadata={
        "help": "Spike guard, rollback: this many consecutive spikes trigger a rollback."})
    spike_max_rollbacks: int = field(default=3, metadata={
        "help": "Spike guard, rollback: stop the run (exit 1) instead of rolling back more often than this; the "
                "training dataset holds rollback_after x max_rollbacks extra global batches for the skipped ones."})
    hang_timeout_s: float | None = field(default=1800.0, metadata={
        "help": "Hang watchdog: a rank on which no training step, evaluation batch or save finished for this many "
                "seconds writes every thread's stack to <save>/hang/rank<R>.txt and exits with status 75 (to be "
                "requeued). Choose more than the slowest of these (the first step may compile; a synchronous save "
                "of a large model to a shared file system takes minutes). 0 (or null): off."})

    def __post_init__(self):
        if self.max_consecutive_nan_steps < 1:
            raise UserError(f"resilience.max_consecutive_nan_steps={self.max_consecutive_nan_steps} must be >= 1")
        if self.spike_zscore is not None and self.spike_zscore <= 0:
            raise UserError(f"resilience.spike_zscore={self.spike_zscore} must be > 0 (omit it to disable the guard)")
        if self.spike_window < 2:
            raise UserError(f"resilience.spike_window={self.spike_window} must be >= 2 (a standard deviation needs two)")
        if self.spike_rollback_after < 1 or self.spike_max_rollbacks < 1:
            raise UserError("resilience.spike_rollback_after and resilience.spike_max_rollbacks must be >= 1")
        if self.hang_timeout_s is not None and not self.hang_timeout_s >= 0:  # NaN too
            raise UserError(f"resilience.hang_timeout_s={self.hang_timeout_s} must be >= 0 (0 turns the watchdog off)")
