"""Data-parallel pretraining sampler: global batches of consecutive samples, resumable exactly.

    sampler = PretrainingSampler(total_samples=len(train), consumed_samples=0, micro_batch_size=4,
                                 data_parallel_rank=dp_rank, data_parallel_size=dp, global_batch_size=64)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, num_workers=cfg.data.num_workers)
    after each optimizer step:  sampler.advance()            (consumed_samples += global_batch_size)
    checkpoint: sampler.state_dict();  resume: sampler.load_state_dict(sd), then iterate anew

Global batch g is samples [c0 + g*G, c0 + (g+1)*G) of the dataset (c0 = consumed_samples when the
iteration starts, G = global batch). It is cut into A = G / (micro x dp) accumulation steps; in step
a, rank r gets the micro batch

    c0 + g*G + a*(micro*dp) + r*micro + [0, micro)

(Megatron's MegatronPretrainingSampler order). Every (dp, micro) split of the same G therefore sees
the same set of samples in every global batch, so the averaged gradient is the same: a run may
resume on a different number of ranks. An incomplete last global batch is dropped.

Skipped global batches (`skip([start, ...])`, the loss-spike guard's rollback): a global batch whose
first sample is in the skip list is passed over, by the iterator and by `advance()` alike, so the
data position moves past it; the list is part of the state.

The iterator yields lists of dataset indices (a DataLoader batch_sampler). It does not count what
it yields - a DataLoader prefetches ahead of training - so the trainer calls `advance()` once per
optimizer step and checkpoints `state_dict()`.
"""
from __future__ import annotations

from typing import Iterator

from megaclm.utils.errors import UserError


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, global_batch_size: int | None = None):
        global_batch_size = global_batch_size or micro_batch_size * data_parallel_size
        if total_samples < 1:
            raise UserError(f"the training dataset has {total_samples} samples; nothing to train on")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise UserError(f"micro batch {micro_batch_size} and data-parallel size {data_parallel_size} must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise UserError(f"data-parallel rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if global_batch_size % (micro_batch_size * data_parallel_size):
            raise UserError(f"global batch {global_batch_size} is not divisible by micro batch {micro_batch_size} x "
                            f"data-parallel size {data_parallel_size}")
        if consumed_samples < 0:
            raise UserError(f"consumed_samples={consumed_samples} must be >= 0")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.global_batch_size = global_batch_size
        self.skipped: list[int] = []  # first samples of the global batches to pass over

    def __len__(self) -> int:
        """Micro batches this rank will yield from the current position."""
        steps = (self.total_samples - self.consumed_samples) // self.global_batch_size
        return max(0, steps) * self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def __iter__(self) -> Iterator[list[int]]:
        mbs, dp, gbs = self.micro_batch_size, self.data_parallel_size, self.global_batch_size
        start = self.consumed_samples
        mine = self.data_parallel_rank * mbs
        while start + gbs <= self.total_samples:
            if start in self.skipped:
                start += gbs
                continue
            for a in range(0, gbs, mbs * dp):
                first = start + a + mine
                yield list(range(first, first + mbs))
            start += gbs

    def advance(self, num_samples: int | None = None) -> None:
        """Record one optimizer step (or `num_samples` samples) as consumed."""
        self.consumed_samples += self.global_batch_size if num_samples is None else num_samples
        self._past_skipped()

    def skip(self, starts: list[int]) -> None:
        """Never yield the global batches that start at these samples (positions not yet consumed)."""
        bad = [s for s in starts if s < self.consumed_samples]
        if bad:
            raise ValueError(f"cannot skip global batches at {bad}: samples up to {self.consumed_samples} are consumed")
        self.skipped = sorted(set(self.skipped) | set(starts))
        self._past_skipped()

    def _past_skipped(self) -> None:
        while self.consumed_samples in self.skipped:
            self.consumed_samples += self.global_batch_size

    def batch_start(self, steps: int) -> int:
        """First sample of the global batch `steps` optimizer steps after the current position."""
        start = self.consumed_samples
        for _ in range(steps + 1):
            while start in self.skipped:
                start += self.global_batch_size
            first, start = start, start + self.global_batch_size
        return first

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "global_batch_size": self.global_batch_size,
                "total_samples": self.total_samples, "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if not 0 <= consumed <= self.total_samples:
            raise UserError(f"the checkpoint consumed {consumed} samples but the training dataset has "
                            f"{self.total_samples}; resume with at least the original --train-samples/--train-iters")
        self.consumed_samples = consumed
        self.skipped = list(state.get("skipped", []))
