"""Tensor-parallel RNG: dropout that matches across TP ranks where activations are replicated, and
differs where they are split (attention heads, sequence-parallel chunks).

Two streams, as in Megatron: the default generator (seeded identically on the ranks of a TP group) and
a "model-parallel-rng" stream (seed + 2718 + tp_rank + 1009 seq_rank) entered with `tp_rng_fork()`. Both live in
DeepSpeed's own tracker, `deepspeed.checkpointing.get_cuda_rng_tracker()`, because DeepSpeed's activation
checkpointing saves and replays exactly that tracker (plus the default generator) when it recomputes a
layer: a private tracker would give the recomputed dropout masks different bits. On CPU DeepSpeed's
"cuda" generator is torch's CPU default generator, so the same code runs on both.
"""
import contextlib
import random

import deepspeed
import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron's offset, so checkpoints of both agree on streams
_PP_SEED_OFFSET = 100
_SEQ_SEED_OFFSET = 1009  # ranks of the sequence axis hold different tokens/heads: their own streams


def rng_tracker():
    return deepspeed.checkpointing.get_cuda_rng_tracker()


def model_parallel_seed(seed: int, tp_rank: int = 0, pp_rank: int = 0, seq_rank: int = 0) -> None:
    """Seed python/numpy/torch for this rank and (re)create the tracker's model-parallel stream.

    Pipeline stages get different seeds (their layers are different); ranks of one TP group share the
    default seed and differ in the model-parallel stream (so do the ranks of the sequence axis, Ulysses or
    ring, which share the default seed); data-parallel replicas share both, which keeps
    their initial weights identical (data-dependent randomness comes from the data order).
    """
    base = seed + _PP_SEED_OFFSET * pp_rank
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(base)
    tracker = rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, base + _TP_SEED_OFFSET + tp_rank + _SEQ_SEED_OFFSET * seq_rank)


def tp_rng_fork(enabled: bool = True):
    """Context manager: run under the model-parallel stream (a no-op when `enabled` is False).

    The stream must have been created by `model_parallel_seed`; single-process code that never seeded
    gets a plain no-op when `enabled` is False, so only tensor/sequence-parallel regions need it.
    """
    if not enabled:
        return contextlib.nullcontext()
    tracker = rng_tracker()
    if MODEL_PARALLEL_RNG not in tracker.get_states():
        raise RuntimeError("tensor-parallel dropout needs megaclm.parallel.random.model_parallel_seed(seed, tp_rank) "
                           "to be called first")
    return tracker.fork(MODEL_PARALLEL_RNG)
