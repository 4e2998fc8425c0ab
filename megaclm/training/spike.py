"""Loss-spike guard (`--spike-zscore Z --spike-window N --spike-action skip|rollback`).

A step's loss (averaged over the data-parallel ranks, so every rank decides the same) is compared
with the last N accepted losses: z = (loss - mean) / std. A step with z > Z is a spike:
  - its update is not applied: the loop makes the last micro-batch's loss non-finite before its
    backward, so the optimizer (DeepSpeed's wrappers, or megaclm's SkipNonFiniteAdamW) skips the step
    on every rank - Adam moments, step counts and weights stay as they were (with fp16 the dynamic
    loss scale also halves, as for any overflow);
  - with `rollback`, after K spikes in a row (`--spike-rollback-after`) the run reloads the last
    checkpoint (weights, optimizer, RNG, data position) and the sampler skips the K offending global
    batches from then on (megaclm.data.sampler skip list, saved in every later checkpoint), so the
    replay is deterministic and a resumed run skips them too.
The window fills first (no judgement before N accepted losses); non-finite losses are left to
`--max-consecutive-nan-steps`. Losses only: a grad-norm guard would need the norm before the
optimizer step, which DeepSpeed computes inside it.

The guard's state (window, consecutive spikes, the offending batches) is saved in the checkpoint.
"""
from __future__ import annotations

import math
from typing import Any

# A window whose losses are all equal has std 0: any larger loss would be "infinitely" many sigmas away.
_MIN_STD = 1e-6


def extra_train_batches(resilience: ResilienceConfig) -> int:
    """Global batches the training dataset holds beyond train_iters: room for the batches rollbacks skip."""
    if resilience.spike_zscore is None or resilience.spike_action != "rollback":
        return 0
    return resilience.spike_rollback_after * resilience.spike_max_rollbacks


class SpikeGuard:
    def __init__(self, zscore: float, window: int):
        self.zscore, self.window = zscore, window
        self.losses: list[float] = []  # the last `window` accepted losses
        self.consecutive = 0
        self.offending: list[dict] = []  # the current run of spikes: {"iteration", "first_sample", "loss", "z"}

    def z_of(self, loss: float) -> float | None:
        if len(self.losses) < self.window or not math.isfinite(loss):
            return None
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        return (loss - mean) / max(std, _MIN_STD)

    def is_spike(self, loss: float) -> bool:
        z = self.z_of(loss)
        return z is not None and z > self.zscore

    def record(self, loss: float, spike: bool, iteration: int, first_sample: int) -> None:
        """After the step: a spike joins the current run; an accepted finite loss joins the window."""
        if spike:
            self.consecutive += 1
            self.offending.append({"iteration": iteration, "first_sample": first_sample, "loss": loss,
                                   "z": self.z_of(loss)})
            return
        if math.isfinite(loss):
            self.losses = (self.losses + [loss])[-self.window:]
            self.consecutive, self.offending = 0, []

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "consecutive": self.consecutive, "offending": list(self.offending)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state["losses"])[-self.window:]
        self.consecutive, self.offending = state["consecutive"], list(state["offending"])
