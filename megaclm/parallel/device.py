"""The device of this rank's collectives and batches: the CUDA device init_distributed selected, None on CPU."""
from __future__ import annotations

import torch


def rank_device() -> torch.device | None:
    """Where tensors for collectives and the model's inputs live (NCCL takes CUDA tensors only); None on a CPU run,
    where torch's default device (the CPU) serves gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
