"""GPTDataset: fixed-length training samples cut from one MMIDIDX dataset (Megatron's semantics).

    ds = GPTDataset(IndexedDataset(prefix), SampleSpec(seq_length=4, seed=1234, eod_id=0),
                    split="train", sequence_range=(0, 5), num_samples=6, cache=IndexCache(dir))
    ds[i] -> {"tokens": (S,) int64, "labels": (S,) int64, "loss_mask": (S,) float32,
              "position_ids": (S,) int64, "document_ids": (S,) int64  (only with reset_attention_mask:
              equal ids = one document; the model turns them into per-document causal attention)}

Samples are seq_length + 1 consecutive tokens of a stream that runs through the documents across
their boundaries (tokens = first S, labels = last S). Three index arrays, deterministic from
(seed, seq_length, num_samples, split range, dataset), define the stream and cached on disk:

    document_index  the sequence ids of the split, once per epoch, each epoch shuffled on its own;
                    as many epochs as num_samples needs
    sample_index    (N + 1, 2): boundary j = (position k in document_index, token offset): sample i
                    runs from boundary i to boundary i+1 inclusive (see megaclm.data.helpers)
    shuffle_index   (N,): dataset item -> sample number; a permutation of all samples, except that
                    when the last epoch is used for less than 80% of its samples, the samples of the
                    earlier epochs and those of the last are shuffled separately (a small last epoch
                    is not spread over the whole run)

Worked example - 3 documents of 4, 2 and 5 tokens (11 tokens), seq_length = 4, num_samples = 4:
    one epoch gives (11 - 1) // 4 = 2 samples; 2 epochs give (22 - 1) // 4 = 5 >= 4, so 2 epochs.
    4 - 2 = 2 samples are needed from epoch 2, not under 80% of an epoch's 2: no separate last epoch.
    document_index = [2, 0, 1 | 1, 2, 0]   (each epoch a permutation; stream 5+4+2 | 2+5+4 tokens)
    sample_index   = [[0,0], [0,4], [1,3], [3,1], [4,3], [5,2]]
        boundary 1 at stream position 4: document 2 (tokens 0..4) at offset 4
        boundary 2 at position 8: document 0 (tokens 5..8) at offset 3
        boundary 3 at position 12: document 1 of epoch 2 (positions 11..12) at offset 1
    sample 1 = doc2[4:5] + doc0[0:4]  (5 tokens: inputs doc2[4], doc0[0..2]; labels doc0[0..3])
    shuffle_index  = a permutation of [0, 1, 2, 3, 4];  len(ds) = 5 (>= the 4 requested)

Document-aware masks (Megatron's get_ltor_masks_and_position_ids, from the eod tokens *inside*
the sample): `reset_position_ids` restarts positions after each eod; `reset_attention_mask` lets a
token attend only to earlier tokens after the last eod before it (as `document_ids`: the number of
eods before each token; never an (S, S) mask); `eod_mask_loss` zeroes the loss
where the input token is eod. Unlike Megatron, every epoch of the document index is a permutation
of its own (each document is seen once per epoch), and multi-sequence documents are split by
document but streamed by sequence.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megaclm.data import helpers
from megaclm.data.cache import IndexCache, from_mmap_reference, mmap_reference
from megaclm.data.indexed_dataset import IndexedDataset, index_file_path
from megaclm.utils.errors import UserError

INDEX_VERSION = 1  # bump when the index semantics change: old caches then miss instead of misleading
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


@dataclass(frozen=True)
class SampleSpec:
    """What one sample looks like; the same for every dataset of a run."""

    seq_length: int
    seed: int
    eod_id: int | None = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    def __post_init__(self):
        needs_eod = self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask
        if needs_eod and self.eod_id is None:
            raise UserError("--eod-mask-loss/--reset-position-ids/--reset-attention-mask need the tokenizer's "
                            "end-of-document id; the tokenizer defines none")


def samples_per_epoch(tokens_per_epoch: int, seq_length: int) -> int:
    """Samples of seq_length + 1 tokens (consecutive samples share one) in one pass over the sequences."""
    return max(0, (tokens_per_epoch - 1) // seq_length)


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose token stream holds num_samples samples of seq_length + 1 tokens."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_gpt_indices(sizes: np.ndarray, sequence_ids: np.ndarray, seq_length: int, num_samples: int, seed: int,
                      impl: str | None = None) -> dict[str, np.ndarray]:
    """The three index arrays of the module docstring, for the sequences `sequence_ids` (ids into sizes)."""
    tokens_per_epoch = int(sizes[sequence_ids].sum(dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if num_epochs > 1 else 0
    per_epoch = samples_per_epoch(tokens_per_epoch, seq_length)
    separate_last = num_epochs > 1 and (num_samples - before_last) < int(SEPARATE_LAST_EPOCH_THRESHOLD * per_epoch)

    rng = np.random.RandomState(seed)  # RandomState: its streams are frozen across numpy versions
    ids = np.asarray(sequence_ids, dtype=np.int32)
    document_index = np.concatenate([rng.permutation(ids) for _ in range(num_epochs)])
    sample_index = helpers.build_sample_index(sizes, document_index, seq_length, total, impl=impl)
    first = before_last if separate_last else total
    dtype = np.int32 if total <= np.iinfo(np.int32).max else np.int64
    shuffle_index = np.concatenate([rng.permutation(np.arange(first, dtype=dtype)),
                                    first + rng.permutation(np.arange(total - first, dtype=dtype))]).astype(dtype)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def make_sample(text: np.ndarray, spec: SampleSpec) -> dict[str, np.ndarray]:
    """seq_length + 1 token ids -> the sample dict (inputs, shifted labels, masks, positions)."""
    text = text.astype(np.int64, copy=False)
    tokens, labels = text[:-1], text[1:]
    s = len(tokens)
    sample = {"tokens": tokens, "labels": labels, "loss_mask": np.ones(s, np.float32),
              "position_ids": np.arange(s, dtype=np.int64)}
    if spec.eod_id is None:
        return sample
    is_eod = tokens == spec.eod_id
    if spec.eod_mask_loss:
        sample["loss_mask"][is_eod] = 0.0
    if spec.reset_position_ids or spec.reset_attention_mask:
        # segment[j] = number of eods strictly before j; a new document starts right after each eod.
        segment = np.concatenate([[0], np.cumsum(is_eod[:-1])])
        if spec.reset_position_ids:
            starts = np.concatenate([[0], np.flatnonzero(is_eod) + 1])
            sample["position_ids"] = sample["position_ids"] - starts[segment]
        if spec.reset_attention_mask:
            sample["document_ids"] = segment.astype(np.int64)
    return sample


class GPTDataset:
    """Samples of one dataset's split; see the module docstring."""

    def __init__(self, indexed: IndexedDataset, spec: SampleSpec, *, split: str, sequence_range: tuple[int, int],
                 num_samples: int | None, cache: IndexCache, impl: str | None = None):
        self.indexed = indexed
        self.spec = spec
        self.split = split
        start, end = sequence_range
        sizes = indexed.sizes
        tokens = int(sizes[start:end].sum(dtype=np.int64))
        where = f"dataset {indexed.prefix} ({split} split: sequences [{start}, {end}) of {len(indexed)})"
        if end <= start:
            raise UserError(f"{where} has no documents; give it more documents or change --split")
        if tokens < spec.seq_length + 1:
            raise UserError(f"{where} has {tokens} tokens, fewer than one sample of --seq-length "
                            f"{spec.seq_length} + 1; lower --seq-length or give it more data")
        if num_samples is None:
            num_samples = samples_per_epoch(tokens, spec.seq_length)
        self.description = {
            "class": "GPTDataset", "version": INDEX_VERSION,
            "dataset_path": os.path.abspath(indexed.prefix),
            "index_bytes": os.path.getsize(index_file_path(indexed.prefix)),
            "num_sequences": len(indexed), "num_tokens_in_split": tokens,
            "split": split, "sequence_range": [int(start), int(end)],
            "seq_length": spec.seq_length, "num_samples": int(num_samples), "seed": spec.seed,
            # follow from the fields above; said for the reader of the cache: how many passes over the split it holds
            "samples_per_epoch": samples_per_epoch(tokens, spec.seq_length),
            "num_epochs": num_epochs_for(tokens, spec.seq_length, int(num_samples)),
        }
        ids = np.arange(start, end, dtype=np.int32)
        arrays, self.built = cache.get_or_build(
            f"GPTDataset-{split}", self.description,
            lambda: build_gpt_indices(sizes, ids, spec.seq_length, num_samples, spec.seed, impl))
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver get the dataset pickled: send file names,
        # not the memory maps (pickling a memmap copies the whole file).
        state = dict(self.__dict__)
        state["indexed"] = self.indexed.prefix
        for key in ("document_index", "sample_index", "shuffle_index"):
            state[key] = mmap_reference(state[key])
        return state

    def __setstate__(self, state: dict) -> None:
        state["indexed"] = IndexedDataset(state["indexed"])
        for key in ("document_index", "sample_index", "shuffle_index"):
            state[key] = from_mmap_reference(state[key])
        self.__dict__.update(state)

    def tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 token ids of item idx."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples of {self.indexed.prefix}")
        i = int(self.shuffle_index[idx])
        (k0, off0), (k1, off1) = self.sample_index[i].tolist(), self.sample_index[i + 1].tolist()
        doc = self.document_index
        if k0 == k1:
            return self.indexed.get(int(doc[k0]), off0, off1 - off0 + 1)
        parts = [self.indexed.get(int(doc[k0]), off0)]
        parts += [self.indexed.get(int(doc[k])) for k in range(k0 + 1, k1)]
        parts.append(self.indexed.get(int(doc[k1]), 0, off1 + 1))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return make_sample(self.tokens(idx), self.spec)
