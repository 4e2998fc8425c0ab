"""Epochs: how big one pass over the training data is, and how many passes a run makes over each dataset.

    split = train_split(cfg.data)          # None with --mock-data (synthetic data has no size)
    split.samples_per_epoch                # what --train-epochs and the logged "epoch" count in
    passes_line(split, drawn_per_dataset(train_dataset, n))   # the start-up summary

One pass over a dataset is the samples its train split yields at --seq-length, as GPTDataset cuts
them: (tokens in the split - 1) // seq_length (a sample is seq_length + 1 tokens, consecutive samples
share one). One epoch of the training data is one pass over every training dataset: for a blend, the
sum of its datasets' passes (what Megatron's blend builds when every dataset is used once), whatever
the weights. The run's epoch is consumed samples / samples per epoch (fractional); a weighted blend
passes over its datasets at other rates, which the start-up line says per dataset.

Worked example - A's train split holds 46,657 tokens, B's 23,361, --seq-length 64:
    A: 46,656 // 64 = 729 samples per pass, B: 23,360 // 64 = 365; one epoch = 1,094 samples
    --train-epochs 2, global batch 16: ceil(2 x 1,094 / 16) = 137 iterations, 2,192 samples (2.004 epochs)
    weights 0.5 A 0.5 B draw ~1,096 samples from each: 1.50 passes over A, 3.00 over B
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megaclm.config.data import DataConfig
from megaclm.data.blended_dataset import BlendedDataset
from megaclm.data.builder import blend_sources
from megaclm.data.gpt_dataset import samples_per_epoch
from megaclm.data.indexed_dataset import IndexedDataset
from megaclm.data.splits import split_sequence_range


@dataclass(frozen=True)
class TrainSplit:
    """The training datasets as the trainer reads them: per dataset its prefix, the samples of one pass over its
    train split, and its blend weight (normalized; by tokens when the blend gives none, as the builder)."""

    prefixes: list[str]
    samples_per_pass: list[int]
    weights: list[float]

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.samples_per_pass)

    def epoch(self, consumed_samples: int) -> float | None:
        """The run's position in epochs (None: an empty epoch)."""
        return consumed_samples / self.samples_per_epoch if self.samples_per_epoch else None


def train_split(cfg: DataConfig) -> TrainSplit | None:
    """Sizes of the training data from the .idx files alone (no index is built); None with --mock-data."""
    if cfg.mock_data:
        return None
    weights, prefixes, use_split = blend_sources(cfg)["train"]
    fractions = cfg.split_fractions if use_split else None
    tokens = []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        start, end = split_sequence_range(ds.document_indices, "train", fractions)
        tokens.append(int(ds.sizes[start:end].sum(dtype=np.int64)))
    if weights is None:
        weights = [t / max(1, sum(tokens)) for t in tokens]
    return TrainSplit(prefixes, [samples_per_epoch(t, cfg.seq_length) for t in tokens], list(weights))


def drawn_per_dataset(train, num_samples: int) -> list[int]:
    """How many of the first num_samples samples of the training dataset come from each of its datasets."""
    if isinstance(train, BlendedDataset):
        return np.bincount(train.index.dataset_index[:num_samples], minlength=len(train.datasets)).tolist()
    return [num_samples]


def passes_line(split: TrainSplit, drawn: list[int]) -> str:
    """e.g. "data: 2 datasets, 1094 samples per epoch; the run trains 2192 samples = 2.004 epochs: 1.50 passes
    over A (729 samples per pass), 3.00 over B (365)"."""
    n = len(split.prefixes)
    passes = [f"{d / k:.2f}" if k else "n/a" for d, k in zip(drawn, split.samples_per_pass)]
    per = [f"{p} {'passes over ' if i == 0 else 'over '}{name} ({k}{' samples per pass' if i == 0 else ''})"
           for i, (p, name, k) in enumerate(zip(passes, split.prefixes, split.samples_per_pass))]
    epochs = split.epoch(sum(drawn))
    return (f"data: {n} dataset{'s' if n > 1 else ''}, {split.samples_per_epoch} samples per epoch; the run trains "
            f"{sum(drawn)} samples = {'n/a' if epochs is None else format(epochs, '.3f')} epochs: " + ", ".join(per))
