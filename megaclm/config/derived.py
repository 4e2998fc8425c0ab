"""Values computed from the config and the world size; never written back into the config.

    data_parallel_size = world_size / (tensor x pipeline x sequence split (Ulysses or context parallel))
    grad_accum_steps   = global_batch_size / (micro_batch_size x data_parallel_size)
    tokens_per_step    = global_batch_size x seq_length   (at full sequence length)
    train_iters        = --train-iters, or ceil(--train-samples / global batch),
                         or ceil(--train-tokens / tokens_per_step)
    padded_vocab_size  = tokenizer vocab rounded up to a multiple of
                         make_vocab_size_divisible_by x tensor size (Megatron's rule)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from megaclm.utils.errors import UserError


@dataclass(frozen=True)
class Derived:
    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum_steps: int
    seq_length: int
    tokens_per_step: int
    train_iters: int | None
    train_samples: int | None
    vocab_size: int | None = None
    padded_vocab_size: int | None = None
    seq_split_size: int = 1  # ranks sharing one sample along T (--ds-sequence-parallel-size or --context-parallel-size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_size: int) -> int:
    multiple = max(divisible_by, 1) * tensor_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def train_iters_for(training: Any, global_batch_size: int, seq_length: int) -> int | None:
    """The run's length in iterations at this global batch (None: no length given). Megatron-DeepSpeed's
    --train-tokens may cap --train-iters/--train-samples: the first limit reached stops."""
    t, gbs = training, global_batch_size
    limits = [n for n in (t.train_iters, None if t.train_samples is None else -(-t.train_samples // gbs),
                          None if t.train_tokens is None else -(-t.train_tokens // (gbs * seq_length))) if n is not None]
    return min(limits) if limits else None


def compute_derived(cfg: Any, world_size: int, vocab_size: int | None = None) -> Derived:
    """`cfg` is a MegaclmConfig (or any object with parallel/training/data sections)."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    split = cfg.parallel.seq_split_size
    if world_size < 1 or world_size % (tp * pp * split):
        raise UserError(f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size={tp} x "
                        f"parallel.pipeline_model_parallel_size={pp} x the sequence split {split} "
                        f"(--ds-sequence-parallel-size / --context-parallel-size); launch a multiple of "
                        f"{tp * pp * split} processes")
    dp = world_size // (tp * pp * split)
    ep = cfg.parallel.expert_model_parallel_size
    if (dp * split) % ep:
        raise UserError(f"parallel.expert_model_parallel_size={ep} does not divide the data-parallel size {dp} x "
                        f"the sequence split {split} (world {world_size} / tp {tp} / pp {pp}); expert-parallel "
                        f"ranks are data-parallel or sequence ranks, so launch a multiple of {tp * pp * ep} "
                        f"processes with a multiple of {ep} data-parallel x sequence ranks")
    t = cfg.training
    mbs = t.micro_batch_size
    gbs = t.global_batch_size if t.global_batch_size is not None else mbs * dp
    if gbs % (mbs * dp):
        raise UserError(f"training.global_batch_size={gbs} is not divisible by training.micro_batch_size={mbs} x "
                        f"data-parallel size {dp} (world {world_size} / tp {tp} / pp {pp}); "
                        f"use a global batch that is a multiple of {mbs * dp}")
    seq = cfg.data.seq_length
    chunks = split * (2 if cfg.parallel.context_parallel_size > 1 else 1)  # ring: 2 load-balanced chunks per rank
    if seq % chunks:
        raise UserError(f"data.seq_length={seq} is not divisible by {chunks} (the sequence is split into "
                        f"{'2 x ' if chunks != split else ''}{split} chunks by --ds-sequence-parallel-size / "
                        f"--context-parallel-size); use a --seq-length that is a multiple of {chunks}")
    d = cfg.data
    if chunks > 1 and d.curriculum_seqlen_start is not None and (d.curriculum_seqlen_multiple % chunks
                                                                 or d.curriculum_seqlen_start % chunks):
        raise UserError(f"data.curriculum_seqlen_multiple={d.curriculum_seqlen_multiple} and "
                        f"data.curriculum_seqlen_start={d.curriculum_seqlen_start} must be multiples of {chunks}: "
                        "every warmup length is split across the sequence ranks; pass "
                        f"--curriculum-seqlen-multiple {chunks * max(1, d.curriculum_seqlen_multiple // chunks)}")
    tokens_per_step = gbs * seq
    iters = train_iters_for(t, gbs, seq)
    padded = None
    if vocab_size is not None:
        padded = pad_vocab_size(vocab_size, cfg.tokenizer.make_vocab_size_divisible_by, tp)
    return Derived(world_size=world_size, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   data_parallel_size=dp, micro_batch_size=mbs, global_batch_size=gbs,
                   grad_accum_steps=gbs // (mbs * dp), seq_length=seq, tokens_per_step=tokens_per_step,
                   train_iters=iters, train_samples=None if iters is None else iters * gbs,
                   vocab_size=vocab_size, padded_vocab_size=padded, seq_split_size=split)
