"""The run's position (saved in every checkpoint) and the error a diverged run stops with."""
from __future__ import annotations

from dataclasses import asdict, dataclass


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or loss spikes, or non-finite weights at a save."""


@dataclass
class Progress:
    """megaclm's training progress; saved in every checkpoint's client state under "progress"."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None
    rollbacks: int = 0  # loss-spike guard rollbacks so far (megaclm.training.spike)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
