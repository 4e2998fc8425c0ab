"""Values computed from the config and the world size; never written back into the config.

    data_parallel_size = world_size / (tensor x pipeline x sequence split (Ulysses or context parallel))
    grad_accum_steps   = global_batch_size / (micro_batch_size x data_parallel_size)
    tokens_per_step    = global_batch_size x seq_length   (at full sequence length)
    train_iters        = --train-iters, or ceil(--train-samples / global batch),
                         or ceil(--train-tokens / tokens_per_step),
                         or ceil(--train-epochs x samples_per_epoch / global batch) (the run covers at
                         least N epochs, ending at the first global batch that completes them; exact
                         when the global batch divides N x samples_per_epoch)
    samples_per_epoch  samples of one pass over the training data at --seq-length (megaclm.data.epochs;
                         given by the caller, which reads the datasets; None: unknown, e.g. --mock-data)
    padded_vocab_size  = tokenizer vocab rounded up to a multiple of
                         make_vocab_size_divisible_by x tensor size (Megatron's rule)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from megaclm.config.training import TrainingConfig
from megaclm.utils.errors import UserError

if TYPE_CHECKING:  # the package imports this module
    from megaclm.config import MegaclmConfig


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
    samples_per_epoch: int | None = None  # one pass over the training data (megaclm.data.epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                   tensor_model_parallel_size: int = 1) -> int:
    """Megatron's rule: round up to a multiple of divisible_by x TP, so every TP shard of the
    embedding gets the same number of rows and each shard's row count stays a multiple of
    divisible_by (a friendly size for the matmul kernels). 50257 -> 50304 for 128 x 1."""
    if make_vocab_size_divisible_by < 1:
        raise UserError(f"tokenizer.make_vocab_size_divisible_by={make_vocab_size_divisible_by} must be >= 1")
    if tensor_model_parallel_size < 1:
        raise UserError(f"parallel.tensor_model_parallel_size={tensor_model_parallel_size} must be >= 1")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def epoch_iters(train_epochs: float, samples_per_epoch: int, global_batch_size: int) -> int:
    """ceil(epochs x samples_per_epoch / global batch), in exact arithmetic (2.0 x 728 / 16 is 91, not 91.00001)."""
    if samples_per_epoch < 1:
        raise UserError(f"training.train_epochs={train_epochs:g}: the training data holds no sample of --seq-length "
                        "tokens, so an epoch is empty; give the run more data or a shorter --seq-length")
    return max(1, math.ceil(Fraction(repr(float(train_epochs))) * samples_per_epoch / global_batch_size))


def train_iters_for(training: TrainingConfig, global_batch_size: int, seq_length: int,
                    samples_per_epoch: int | None = None, tokens_iters: int | None = None) -> int | None:
    """The run's length in iterations at this global batch (None: no length given, or --train-epochs without the
    epoch's size). Megatron-DeepSpeed's --train-tokens may cap --train-iters/--train-samples: the first limit
    reached stops. `tokens_iters`: the step at which --train-tokens is reached when a sequence-length warmup makes
    early steps shorter (megaclm.data.curriculum; default: at full length)."""
    t, gbs = training, global_batch_size
    if t.train_epochs is not None:  # exclusive with the other lengths (TrainingConfig)
        return None if samples_per_epoch is None else epoch_iters(t.train_epochs, samples_per_epoch, gbs)
    if t.train_tokens is not None and tokens_iters is None:
        tokens_iters = -(-t.train_tokens // (gbs * seq_length))
    limits = [n for n in (t.train_iters, None if t.train_samples is None else -(-t.train_samples // gbs),
                          tokens_iters) if n is not None]
    return min(limits) if limits else None


def compute_derived(cfg: MegaclmConfig, world_size: int, vocab_size: int | None = None,
                    samples_per_epoch: int | None = None) -> Derived:
    """`samples_per_epoch` (read from the datasets by the caller) sets the length of a --train-epochs run."""
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
    layout = Derived(world_size=world_size, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     data_parallel_size=dp, micro_batch_size=mbs, global_batch_size=gbs,
                     grad_accum_steps=gbs // (mbs * dp), seq_length=seq, tokens_per_step=gbs * seq,
                     train_iters=None, train_samples=None, seq_split_size=split)
    return with_inputs(layout, cfg, vocab_size, samples_per_epoch)


def with_inputs(derived: Derived, cfg: MegaclmConfig, vocab_size: int | None = None,
                samples_per_epoch: int | None = None, tokens_iters: int | None = None) -> Derived:
    """`derived` completed with what only a caller that reads files knows (parse_args reads none): the tokenizer's
    vocabulary, the training data's epoch size, the step at which --train-tokens is reached under a sequence-length
    warmup. The layout values (checked once, by compute_derived) are kept."""
    iters = train_iters_for(cfg.training, derived.global_batch_size, derived.seq_length, samples_per_epoch,
                            tokens_iters)
    padded = None if vocab_size is None else pad_vocab_size(
        vocab_size, cfg.tokenizer.make_vocab_size_divisible_by, derived.tensor_model_parallel_size)
    return dataclasses.replace(derived, train_iters=iters,
                               train_samples=None if iters is None else iters * derived.global_batch_size,
                               vocab_size=vocab_size, padded_vocab_size=padded, samples_per_epoch=samples_per_epoch)
