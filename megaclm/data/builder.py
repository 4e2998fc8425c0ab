"""The trainer's entry point: DataConfig -> train, valid, test datasets (indices built or loaded from cache).

    n_train, n_valid, n_test = train_valid_test_num_samples(train_iters, global_batch_size, eval_interval, eval_iters)
    train, valid, test = build_train_valid_test(cfg.data, seed=cfg.training.seed, train_samples=n_train,
                                                valid_samples=n_valid, test_samples=n_test,
                                                eod_id=tokenizer.eod, global_batch_size=gbs)

Each result is a GPTDataset (one dataset) or a BlendedDataset (several), or None when that split
has no samples requested or no documents. len(train) >= train_samples; items are sample dicts
(megaclm.data.gpt_dataset). Pair train with megaclm.data.sampler.PretrainingSampler and
megaclm.data.curriculum.Curriculum.from_config(cfg.data, gbs).

Where the datasets come from:
- `--data-path` (or `--data-path-file`): one blend, every dataset split by documents per `--split`;
  the training blend follows `--data-mixing-schedule` when given.
- `--train-data-path` / `--valid-data-path` / `--test-data-path`: one blend per split, all documents.
Weights are normalized; a list without weights blends by tokens (a plain concatenation's mix).
A valid/test dataset with no documents in its split is left out of that blend with a warning; a
training dataset without documents or with fewer tokens than one sample is an error naming it.

Caches go to `--data-cache-path`, else a `cache/` directory beside each dataset (blends: beside the
first dataset); see megaclm.data.cache. tools/build_data_indices.py builds them all before launch
and must compute the sample counts as the trainer does: both use train_valid_test_num_samples.
"""
from __future__ import annotations

import os

import numpy as np
import yaml

from megaclm.config.data import DataConfig, parse_blend
from megaclm.data.blended_dataset import BlendedDataset, build_blend
from megaclm.data.cache import DEFAULT_WAIT_S, IndexCache
from megaclm.data.curriculum import Curriculum
from megaclm.data.gpt_dataset import GPTDataset, SampleSpec
from megaclm.data.helpers import backend
from megaclm.data.indexed_dataset import IndexedDataset, index_file_path
from megaclm.data.mock_dataset import MockGPTDataset
from megaclm.data.splits import SPLIT_NAMES, split_sequence_range
from megaclm.logging import get_logger
from megaclm.utils.errors import UserError

log = get_logger("megaclm.data")


def train_valid_test_num_samples(train_iters: int, global_batch_size: int, eval_interval: int,
                                 eval_iters: int) -> tuple[int, int, int]:
    """Megatron's sample counts (G = global batch): train_iters x G, (train_iters // eval_interval + 1) x
    eval_iters x G for validation, eval_iters x G for the test."""
    return (train_iters * global_batch_size,
            (train_iters // eval_interval + 1) * eval_iters * global_batch_size,
            eval_iters * global_batch_size)


def read_data_path_file(path: str) -> list[str]:
    """The --data-path list stored in a file: text ('W PREFIX' pairs, # comments) or a YAML list/mapping."""
    if not os.path.isfile(path):
        raise UserError(f"--data-path-file {path} does not exist; pass a file listing 'WEIGHT PREFIX' pairs")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"--data-path-file {path}: not valid YAML: {e}")
        if isinstance(tree, dict):  # {prefix: weight}
            return [str(x) for prefix, weight in tree.items() for x in (weight, prefix)]
        if isinstance(tree, list):  # [w, p, w, p] or [[w, p], ...] or [p, p]
            flat = [x for item in tree for x in (item if isinstance(item, list) else [item])]
            if all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in flat):
                return [str(x) for x in flat]
        raise UserError(f"--data-path-file {path}: expected a YAML list ('[0.3, A, 0.7, B]' or '[[0.3, A], ...]') "
                        "or a mapping {prefix: weight}")
    items = [tok for line in text.splitlines() for tok in line.split("#", 1)[0].split()]
    if not items:
        raise UserError(f"--data-path-file {path} lists no dataset; write 'WEIGHT PREFIX' pairs, one per line")
    return items


def blend_sources(cfg: DataConfig) -> dict[str, tuple[list[float] | None, list[str], bool]]:
    """split name -> (weights or None, prefixes, whether --split applies), for the splits that have data."""
    if cfg.data_path or cfg.data_path_file:
        items, source = ((cfg.data_path, "data.data_path") if cfg.data_path else
                         (read_data_path_file(cfg.data_path_file), f"--data-path-file {cfg.data_path_file}"))
        weights, prefixes = parse_blend(items, source)
        return {name: (weights, prefixes, True) for name in SPLIT_NAMES}
    paths = {"train": cfg.train_data_path, "valid": cfg.valid_data_path, "test": cfg.test_data_path}
    if not paths["train"]:
        raise UserError("no training data: pass --data-path (or --data-path-file, or --train-data-path)")
    return {name: (*parse_blend(items, f"data.{name}_data_path"), False) for name, items in paths.items() if items}


def cache_dir_for(cfg: DataConfig, prefix: str) -> str:
    """Where the caches of dataset `prefix` live: --data-cache-path, else `cache/` beside the dataset."""
    return cfg.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


class _Builder:
    def __init__(self, cfg: DataConfig, spec: SampleSpec, impl: str | None, cache_wait_s: float):
        self.cfg = cfg
        self.spec = spec
        self.impl = impl
        self.cache_wait_s = cache_wait_s
        self._indexed: dict[str, IndexedDataset] = {}
        self.caches = {"built": 0, "loaded": 0}

    def _count(self, built: bool) -> None:
        self.caches["built" if built else "loaded"] += 1

    def indexed(self, prefix: str) -> IndexedDataset:
        if prefix not in self._indexed:
            ds = IndexedDataset(prefix)
            if len(ds) == 0 or ds.num_tokens() == 0:
                raise UserError(f"dataset {prefix} is empty (no tokens); re-run tools/preprocess_data.py or drop it")
            self._indexed[prefix] = ds
        return self._indexed[prefix]

    def cache_for(self, prefix: str) -> IndexCache:
        return IndexCache(cache_dir_for(self.cfg, prefix), wait_s=self.cache_wait_s)

    def sequence_ranges(self, prefixes: list[str], split: str, use_split: bool) -> list[tuple[int, int]]:
        fractions = self.cfg.split_fractions if use_split else None
        return [split_sequence_range(self.indexed(p).document_indices, split, fractions) for p in prefixes]

    def build(self, split: str, weights, prefixes, use_split: bool, num_samples: int,
              phases: list[tuple[int, list[float]]] | None):
        ranges = self.sequence_ranges(prefixes, split, use_split)
        tokens = [int(self.indexed(p).sizes[a:b].sum(dtype=np.int64)) for p, (a, b) in zip(prefixes, ranges)]
        weights = list(weights) if weights is not None else [t / max(1, sum(tokens)) for t in tokens]
        if phases is None:
            phases = [(0, weights)]
        usable = [b > a and t > self.spec.seq_length for (a, b), t in zip(ranges, tokens)]
        if split != "train":
            dropped = [p for p, ok, w in zip(prefixes, usable, weights) if not ok and w > 0]
            if dropped:
                log.warning(f"{split} split: {len(dropped)} dataset(s) have no sample in it and are left out "
                            f"(e.g. {dropped[0]}; split {self.cfg.split})")
            if not any(ok and w > 0 for ok, w in zip(usable, weights)):
                log.warning(f"{split} split is empty (split {self.cfg.split}); no {split} dataset")
                return None
            phases = [(s, [w if ok else 0.0 for w, ok in zip(ws, usable)]) for s, ws in phases]
        if len(prefixes) == 1:
            return self.dataset(prefixes[0], split, ranges[0], num_samples)
        description = {"split": split, "seed": self.spec.seed, "seq_length": self.spec.seq_length,
                       "datasets": [[os.path.abspath(p), os.path.getsize(index_file_path(p)), list(r)]
                                    for p, r in zip(prefixes, ranges)]}
        index = build_blend(phases, num_samples, self.cache_for(prefixes[0]), description, split, self.impl)
        self._count(index.built)
        counts = index.counts.tolist()
        datasets = [self.dataset(p, split, r, n) if n else None for p, r, n in zip(prefixes, ranges, counts)]
        return BlendedDataset(datasets, index)

    def dataset(self, prefix: str, split: str, seq_range: tuple[int, int], num_samples: int) -> GPTDataset:
        ds = GPTDataset(self.indexed(prefix), self.spec, split=split, sequence_range=seq_range,
                        num_samples=num_samples, cache=self.cache_for(prefix), impl=self.impl)
        self._count(ds.built)
        return ds


def build_train_valid_test(cfg: DataConfig, *, seed: int, train_samples: int, valid_samples: int = 0,
                           test_samples: int = 0, eod_id: int | None = None, global_batch_size: int | None = None,
                           impl: str | None = None, cache_wait_s: float = DEFAULT_WAIT_S,
                           vocab_size: int | None = None):
    """(train, valid, test) datasets; see the module docstring. `global_batch_size` is needed by
    --data-mixing-schedule (phases start at optimizer steps); `impl` forces an index backend;
    `vocab_size` (the tokenizer's) bounds the ids of --mock-data."""
    if train_samples < 1:
        raise UserError(f"train_samples={train_samples}: the run must train on at least one sample")
    spec = SampleSpec(seq_length=cfg.seq_length, seed=seed, eod_id=eod_id, eod_mask_loss=cfg.eod_mask_loss,
                      reset_position_ids=cfg.reset_position_ids, reset_attention_mask=cfg.reset_attention_mask)
    if cfg.mock_data:
        if vocab_size is None:
            raise ValueError("--mock-data needs the tokenizer's vocab_size")
        wanted = (train_samples, valid_samples, test_samples)
        log.info("datasets: mock data (" + ", ".join(f"{s} {n} samples" for s, n in zip(SPLIT_NAMES, wanted)) + ")")
        return tuple(MockGPTDataset(spec, s, n, vocab_size) if n > 0 else None for s, n in zip(SPLIT_NAMES, wanted))
    sources = blend_sources(cfg)
    train_phases = None
    if cfg.data_mixing_schedule:
        if global_batch_size is None:
            raise ValueError("--data-mixing-schedule needs global_batch_size to place its phases")
        n = len(sources["train"][1])
        if len(cfg.mixing_phases[0][1]) != n:
            raise UserError(f"data.data_mixing_schedule has {len(cfg.mixing_phases[0][1])} weights per phase but "
                            f"{n} training datasets are given; give one weight per dataset")
        train_phases = Curriculum.from_config(cfg, global_batch_size).sample_phases(train_samples)
    builder = _Builder(cfg, spec, impl, cache_wait_s)
    wanted = {"train": train_samples, "valid": valid_samples, "test": test_samples}
    out = []
    for split in SPLIT_NAMES:
        if split not in sources or wanted[split] <= 0:
            out.append(None)
            continue
        weights, prefixes, use_split = sources[split]
        if use_split and cfg.split_fractions[SPLIT_NAMES.index(split)] == 0:
            out.append(None)
            continue
        out.append(builder.build(split, weights, prefixes, use_split, wanted[split],
                                 train_phases if split == "train" else None))
    log.info("datasets: " + ", ".join(f"{name} {len(ds) if ds is not None else 0} samples"
                                      for name, ds in zip(SPLIT_NAMES, out))
             + f"; index caches: {builder.caches['built']} built, {builder.caches['loaded']} loaded"
             + f" (backend {backend()})")
    return tuple(out)
