"""--mock-data: synthetic samples for trying a launch script without a corpus (Megatron-LM's flag).

Sample k of a split is a deterministic function of (seed, split, k): documents of random length
(1 to seq_length tokens), each a run of consecutive ids `start, start + 1, ...` (mod the vocabulary,
skipping eod) ended by eod, packed into seq_length + 1 tokens. The runs make the data learnable (the next id is
the current one plus one), so a mock run's loss falls as a real one's would; the sample dict is
GPTDataset's (megaclm.data.gpt_dataset.make_sample), masks and positions included.
"""
from __future__ import annotations

import numpy as np

from megaclm.data.gpt_dataset import SampleSpec, make_sample

_SPLIT_SEED = {"train": 0, "valid": 1, "test": 2}


class MockGPTDataset:
    def __init__(self, spec: SampleSpec, split: str, num_samples: int, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size}: mock data needs at least two ids")
        self.spec, self.split, self.num_samples, self.vocab_size = spec, split, num_samples, vocab_size
        # The eod id must not also be a run token, or documents would end by chance.
        self.eod = spec.eod_id if spec.eod_id is not None else vocab_size - 1
        self.ids = np.delete(np.arange(vocab_size), self.eod)  # the ids a run walks through

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} mock samples")
        rng = np.random.default_rng([self.spec.seed, _SPLIT_SEED[self.split], idx])
        n = self.spec.seq_length + 1
        out = np.empty(n, dtype=np.int64)
        pos = 0
        while pos < n:
            length = int(rng.integers(1, self.spec.seq_length + 1))
            run = self.ids[(int(rng.integers(len(self.ids))) + np.arange(length)) % len(self.ids)]
            doc = np.append(run, self.eod)[: n - pos]
            out[pos:pos + len(doc)] = doc
            pos += len(doc)
        return out

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return make_sample(self.tokens(idx), self.spec)
