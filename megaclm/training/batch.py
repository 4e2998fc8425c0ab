"""Batches for the training loop: datasets -> sampler -> DataLoader -> curriculum cut -> tensors.

    source = build_batch_source(cfg, derived, eod_id, pstate)
    for each step:  it = source.micro_batches(consumed_samples, seqlen)   # grad_accum_steps micro-batches
                    source.advance()                                      # after the optimizer step
    evaluation:     source.eval_micro_batches("valid", i, seqlen)         # global batch i of the split

Every rank of one data-parallel slice (its tensor-parallel peers and pipeline stages) reads the same
samples: the sampler is keyed by the data-parallel rank only (megaclm.data.sampler), so no broadcast
is needed. Under a sequence split (--ds-sequence-parallel-size / --context-parallel-size, n ranks) the ranks
of one seq group read the same micro-batch and each keeps its T/n tokens of every tensor
(megaclm.parallel.context: contiguous for Ulysses, load-balanced chunk pairs for the ring); position ids
keep their global values. A micro-batch is a dict of tensors on the training device
    tokens, labels, position_ids (B, T) int64; loss_mask (B, T) float32;
    document_ids (B, T) int64 (equal = one document), only with --reset-attention-mask
or, for the pipeline engine, DeepSpeed's tuple ((tokens, position_ids[, document_ids]), (labels, loss_mask)).
T is the curriculum's length for the step (samples are cut, never re-read). Evaluation always uses
the first eval_iters global batches of its split, at full length, so every evaluation - and every
resumed run's - sees the same samples.

What the logs say about the data (`data_fields`, `phase_line`, `passes_line`): the epoch (consumed samples /
samples per epoch, megaclm.data.epochs), the data-mixing phase, the blend weights in force and the
sequence length of a step.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from megaclm.config import MegaclmConfig
from megaclm.config.derived import Derived
from megaclm.data.builder import build_train_valid_test
from megaclm.data.curriculum import Curriculum
from megaclm.data.epochs import TrainSplit, drawn_per_dataset, passes_line, train_split
from megaclm.data.sampler import PretrainingSampler
from megaclm.parallel.context import shard_sequence
from megaclm.parallel.device import rank_device
from megaclm.parallel.state import ParallelState
from megaclm.training.batch_change import samples_needed
from megaclm.training.progress import Progress
from megaclm.training.spike import extra_train_batches


def _collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


class BatchSource:
    def __init__(self, cfg: MegaclmConfig, derived: Derived, datasets: tuple, curriculum: Curriculum,
                 pstate: ParallelState, split: TrainSplit | None = None):
        self.cfg, self.derived, self.pstate = cfg, derived, pstate
        self.split = split  # the training data's sizes and weights (None: --mock-data)
        self.train, self.valid, self.test = datasets
        self.curriculum = curriculum
        self.device = rank_device()
        self.sampler = PretrainingSampler(len(self.train), 0, derived.micro_batch_size, pstate.dp_rank,
                                          pstate.dp_size, derived.global_batch_size)
        self._train_iter: Iterator | None = None

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        # Saved at another global batch (allowed without a curriculum: training.batch_change), the schedule's
        # token count differs by design, not because the curriculum flags changed.
        same_batch = state["sampler"]["global_batch_size"] == self.derived.global_batch_size
        self.curriculum.load_state_dict(state["curriculum"], check_tokens=same_batch)
        self._train_iter = None

    def seq_length_at(self, progress: Progress) -> int:
        return self.curriculum.seqlen_at(progress.iteration)

    # ---- what the logs say about the data ---------------------------------------------------------------------
    def epoch(self, consumed_samples: int) -> float | None:
        """Epochs of training data consumed (fractional; None with --mock-data)."""
        return None if self.split is None else self.split.epoch(consumed_samples)

    def blend_weights(self, step: int) -> list[float] | None:
        """The blend weights in force at step (0-based): its data-mixing phase's, else the blend's."""
        phases = self.curriculum.mixing_phases
        if phases:
            return phases[self.curriculum.phase_at(step)][1]
        return None if self.split is None else self.split.weights

    def data_fields(self, step: int, consumed_samples: int) -> dict:
        """The metrics record's data fields for step (0-based), `consumed_samples` after it."""
        return {"epoch": self.epoch(consumed_samples), "phase": self.curriculum.phase_at(step),
                "blend_weights": self.blend_weights(step), "seq_length": self.curriculum.seqlen_at(step)}

    def phase_line(self, step: int) -> str:
        """e.g. "data phase 1 of 2 from iteration 7 (tokens 6144+): blend weights 0.500 A, 0.500 B; seq length 64"."""
        c, weights = self.curriculum, self.blend_weights(step)
        if weights is None:
            blend = "mock data"
        else:
            named = [f"{w:.3f} {p}" for w, p in zip(weights, self.split.prefixes)]
            blend = "blend weights " + ", ".join(named[:8]) + (f" (+{len(named) - 8} more)" if len(named) > 8 else "")
        return (f"data phase {c.phase_at(step)} of {max(1, len(c.mixing_phases))} from iteration {step + 1} "
                f"(tokens {c.tokens_before(step)}+): {blend}; seq length {c.seqlen_at(step)}")

    def passes_line(self, num_samples: int) -> str | None:
        """What the run's first num_samples training samples make of each dataset (None with --mock-data)."""
        return None if self.split is None else passes_line(self.split, drawn_per_dataset(self.train, num_samples))

    # ---- batches --------------------------------------------------------------------------------------------
    def _loader(self, dataset, batch_sampler: PretrainingSampler) -> DataLoader:
        workers = self.cfg.data.num_workers
        # Its own generator: creating a DataLoader iterator draws a worker seed, and from the global
        # generator that draw would shift dropout's stream after a resume (no longer bit-exact).
        generator = torch.Generator().manual_seed(self.cfg.training.seed)
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_collate, num_workers=workers,
                          pin_memory=self.device is not None, generator=generator)

    def _finish(self, batch: dict[str, torch.Tensor], seqlen: int):
        batch = self.curriculum.truncate(batch, seqlen)
        p = self.pstate
        if p.cp_size > 1:
            batch = {k: shard_sequence(v, p.cp_size, p.cp_rank, p.cp_kind == "ring") for k, v in batch.items()}
        if self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.pstate.pp_size == 1:
            return batch
        inputs = (batch["tokens"], batch["position_ids"]) + ((batch["document_ids"],) if "document_ids" in batch else ())
        return inputs, (batch["labels"], batch["loss_mask"])

    def micro_batches(self, consumed_samples: int, seqlen: int) -> Iterator:
        """This rank's micro-batches of the next global batch (lazily: pipeline middle stages read none)."""
        if self._train_iter is None:
            assert consumed_samples == self.sampler.consumed_samples, (consumed_samples, self.sampler.consumed_samples)
            self._train_iter = iter(self._loader(self.train, self.sampler))
        for _ in range(self.derived.grad_accum_steps):
            yield self._finish(next(self._train_iter), seqlen)

    def advance(self) -> None:
        """One optimizer step consumed a global batch."""
        self.sampler.advance()
        self.curriculum.step()

    @property
    def consumed_samples(self) -> int:
        """The data position: samples consumed, skipped global batches included."""
        return self.sampler.consumed_samples

    def skip_batches(self, starts: list[int]) -> None:
        """Pass over the global batches starting at these samples (megaclm.training.spike rollback)."""
        self.sampler.skip(starts)
        self._train_iter = None  # it may have prefetched a skipped batch

    def has_split(self, split: str) -> bool:
        return getattr(self, split) is not None

    def eval_micro_batches(self, split: str, index: int, seqlen: int) -> Iterator:
        """Micro-batches of global batch `index` of a split (sample order as the training sampler's)."""
        dataset = getattr(self, split)
        d, mbs = self.derived, self.derived.micro_batch_size
        start = index * d.global_batch_size
        batches = []
        for a in range(d.grad_accum_steps):
            first = (start + a * mbs * self.pstate.dp_size + self.pstate.dp_rank * mbs) % len(dataset)
            batches.append([(first + j) % len(dataset) for j in range(mbs)])
        for b in batches:  # small and read once per evaluation: no DataLoader workers
            yield self._finish(_collate([dataset[i] for i in b]), seqlen)


def build_batch_source(cfg: MegaclmConfig, derived: Derived, eod_id: int | None, pstate: ParallelState,
                       resumed: dict | None = None) -> BatchSource:
    """Datasets sized for the run (Megatron's counts; evaluation reuses its first eval_iters batches).
    `resumed`: the checkpoint's state, when it was saved at another global batch (the samples it consumed
    are not train_iters x the new batch; megaclm.training.batch_change)."""
    gbs = derived.global_batch_size
    eval_samples = cfg.training.eval_iters * gbs
    extra = extra_train_batches(cfg.resilience)  # room for the batches spike rollbacks skip
    train_samples = (derived.train_iters + extra) * gbs
    if resumed is not None and resumed["data"]["sampler"]["global_batch_size"] != gbs:
        p = resumed["progress"]
        train_samples = max(train_samples, extra * gbs + samples_needed(
            cfg.training, gbs, derived.seq_length, p["iteration"], p["consumed_samples"], p["consumed_tokens"]))
    datasets = build_train_valid_test(cfg.data, seed=cfg.training.seed, train_samples=train_samples,
                                      valid_samples=eval_samples, test_samples=eval_samples, eod_id=eod_id,
                                      global_batch_size=gbs, vocab_size=derived.vocab_size)
    return BatchSource(cfg, derived, datasets, Curriculum.from_config(cfg.data, gbs), pstate, train_split(cfg.data))
