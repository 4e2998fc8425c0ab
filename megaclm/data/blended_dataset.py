"""BlendedDataset: one sample stream drawn from many datasets by weight, with weights that may change
at given sample counts (the data-mixing phases of megaclm.data.curriculum).

    index = build_blend(phases=[(0, [0.9, 0.1]), (5000, [0.5, 0.5])], size=10000, cache=..., description=...)
    index.counts  -> samples each dataset must provide
    blend = BlendedDataset(datasets, index)
    blend[i] -> datasets[index.dataset_index[i]][index.dataset_sample_index[i]]

Within phase p (samples [start_p, start_{p+1})) the blend follows that phase's weights with the
tree rule of megaclm.data.helpers: after n samples of the phase, dataset d has contributed within
B_d <= 2 samples of w_d x n. Every dataset's samples are used in order 0, 1, 2, ... across all
phases (a phase switch never repeats or skips a sample), so resuming at any sample count replays
the same stream. The index arrays are cached like GPTDataset's (megaclm.data.cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megaclm.data import helpers
from megaclm.data.cache import IndexCache, from_mmap_reference, mmap_reference


@dataclass(frozen=True)
class BlendIndex:
    dataset_index: np.ndarray  # (size,) int32: dataset of each blend sample
    dataset_sample_index: np.ndarray  # (size,) int64: sample number inside that dataset
    counts: np.ndarray  # (datasets,) int64: samples drawn from each dataset
    built: bool = False  # whether this process built the cache entry (else it was loaded)


def build_blend_arrays(phases: list[tuple[int, list[float]]], size: int,
                       impl: str | None = None) -> dict[str, np.ndarray]:
    """Index arrays of a phased blend: phase p = (first sample, weights), first phase at 0."""
    num = len(phases[0][1])
    dataset_index = np.empty(size, np.int32)
    dataset_sample_index = np.empty(size, np.int64)
    counts = np.zeros(num, np.int64)
    starts = [min(start, size) for start, _ in phases] + [size]
    for (start, weights), end in zip(phases, starts[1:]):
        start = min(start, size)
        if end <= start:
            continue
        ds, ds_sample = helpers.build_blending_index(helpers.blending_tree(weights), end - start, impl=impl)
        dataset_index[start:end] = ds
        dataset_sample_index[start:end] = ds_sample + counts[ds]  # continue each dataset where it stopped
        counts += np.bincount(ds, minlength=num)
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index, "counts": counts}


def build_blend(phases: list[tuple[int, list[float]]], size: int, cache: IndexCache, description: dict,
                split: str, impl: str | None = None) -> BlendIndex:
    description = {"class": "BlendedDataset", "size": int(size),
                   "phases": [[int(s), [float(x) for x in w]] for s, w in phases], **description}
    arrays, built = cache.get_or_build(f"BlendedDataset-{split}", description,
                                       lambda: build_blend_arrays(phases, size, impl))
    return BlendIndex(arrays["dataset_index"], arrays["dataset_sample_index"], arrays["counts"], built)


class BlendedDataset:
    """Map-style dataset over `datasets` (None where a dataset contributes no sample)."""

    def __init__(self, datasets: list, index: BlendIndex):
        self.datasets = datasets
        self.index = index
        for d, n in enumerate(index.counts.tolist()):
            if n and (datasets[d] is None or len(datasets[d]) < n):
                raise ValueError(f"dataset {d} has {0 if datasets[d] is None else len(datasets[d])} samples, "
                                 f"the blend draws {n}")

    def __len__(self) -> int:
        return len(self.index.dataset_index)

    def __getstate__(self) -> dict:
        index = {k: mmap_reference(getattr(self.index, k)) for k in ("dataset_index", "dataset_sample_index", "counts")}
        return {"datasets": self.datasets, "index": index, "built": self.index.built}

    def __setstate__(self, state: dict) -> None:
        self.datasets = state["datasets"]
        self.index = BlendIndex(**{k: from_mmap_reference(v) for k, v in state["index"].items()}, built=state["built"])

    def source(self, idx: int) -> tuple[int, int]:
        """(dataset number, sample number inside it) of blend item idx."""
        return int(self.index.dataset_index[idx]), int(self.index.dataset_sample_index[idx])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a blend of {len(self)} samples")
        d, s = self.source(idx)
        return self.datasets[d][s]
