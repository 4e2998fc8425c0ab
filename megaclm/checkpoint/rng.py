"""Capture and restore every random stream one rank uses, for bit-exact resume.

python `random`, numpy's global generator, torch's default (CPU) generator, every CUDA device's
generator, and DeepSpeed's RNG tracker (the tensor-parallel dropout stream that activation
checkpointing replays; on CPU its "cuda" states are CPU generator states).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from megaclm.parallel.random import rng_tracker


def get_rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": {name: state.clone() for name, state in rng_tracker().get_states().items()},
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    rng_tracker().set_states(state["tracker"])
