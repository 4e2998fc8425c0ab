"""A dataset fingerprint stored in every checkpoint, so a resume on changed data files is refused.

A resumed run replays the data stream from the saved position; that is only the same stream if the
datasets and the settings that order their samples are unchanged. The fingerprint records, per
split and per blend entry (in blend order):

    {"path": abs prefix, "idx_size", "bin_size", "idx_hash", "bin_hash", "mtime"}

plus the ordering settings (blend weights, --split, --seq-length, --seed, --data-mixing-schedule).
The hashes are cheap: the .idx file whole up to 64 MiB (else its first and last 8 MiB), and 64 KiB
at the start, middle and end of the .bin file, each with the file size. mtimes are recorded for
information only (staging the data to node-local disk changes them); a moved dataset with the same
content is accepted.

    fp = data_fingerprint(cfg.data, seed)        # at startup, written to meta.json
    check_fingerprint(saved_fp, fp, "--load x")  # UserError naming the first changed file
"""
from __future__ import annotations

import hashlib
import os

from megaclm.config.data import DataConfig
from megaclm.data.builder import blend_sources
from megaclm.data.indexed_dataset import data_file_path, index_file_path
from megaclm.utils.errors import UserError

_IDX_WHOLE = 64 << 20  # hash .idx files up to this size whole
_IDX_EDGE = 8 << 20
_BIN_BLOCK = 64 << 10


def _hash_blocks(path: str, blocks: list[tuple[int, int]]) -> str:
    h = hashlib.sha256(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        for offset, length in blocks:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()[:32]


def file_entry(prefix: str) -> dict:
    """Sizes, cheap content hashes and mtime of one dataset's .idx and .bin."""
    idx, bin_ = index_file_path(prefix), data_file_path(prefix)
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    idx_blocks = [(0, idx_size)] if idx_size <= _IDX_WHOLE else [(0, _IDX_EDGE), (idx_size - _IDX_EDGE, _IDX_EDGE)]
    bin_blocks = [(max(0, at), _BIN_BLOCK) for at in (0, bin_size // 2, bin_size - _BIN_BLOCK)]
    return {"path": os.path.abspath(prefix), "idx_size": idx_size, "bin_size": bin_size,
            "idx_hash": _hash_blocks(idx, idx_blocks), "bin_hash": _hash_blocks(bin_, bin_blocks),
            "mtime": max(os.path.getmtime(idx), os.path.getmtime(bin_))}


def data_fingerprint(cfg: DataConfig, seed: int) -> dict:
    """The fingerprint of the datasets `cfg` names (each file read only in small blocks)."""
    splits = {}
    for split, (weights, prefixes, use_split) in ({} if cfg.mock_data else blend_sources(cfg)).items():
        splits[split] = {"weights": weights, "use_split": use_split, "files": [file_entry(p) for p in prefixes]}
    return {"splits": splits, "split": cfg.split, "seq_length": cfg.seq_length, "seed": seed,
            "data_mixing_schedule": list(cfg.data_mixing_schedule), "mock_data": cfg.mock_data}


_HINT = ("resume with the original data, or pass --override-data-fingerprint to continue on the changed data "
         "deliberately (the data stream will not be the one the checkpoint was trained on)")


def check_fingerprint(saved: dict | None, current: dict, source: str) -> None:
    """Refuse a resume whose data differs from the checkpoint's; `source` names the checkpoint in the error."""
    if saved is None:  # a checkpoint from before fingerprints, or an HF import: nothing to compare
        return
    for key, flag in (("seed", "--seed"), ("seq_length", "--seq-length"), ("split", "--split"),
                      ("data_mixing_schedule", "--data-mixing-schedule"), ("mock_data", "--mock-data")):
        if saved.get(key, False if key == "mock_data" else None) != current[key]:
            raise UserError(f"{source} was trained with {flag} {saved.get(key)} but this run has {current[key]}; "
                            f"{_HINT}")
    if set(saved["splits"]) != set(current["splits"]):
        raise UserError(f"{source} was trained with data for the splits {sorted(saved['splits'])} but this run has "
                        f"{sorted(current['splits'])}; {_HINT}")
    for split, old in saved["splits"].items():
        new = current["splits"][split]
        old_paths, new_paths = [f["path"] for f in old["files"]], [f["path"] for f in new["files"]]
        if len(old_paths) != len(new_paths) or old["weights"] != new["weights"]:
            raise UserError(f"{source}: the {split} blend changed from {old['weights']} x {old_paths} to "
                            f"{new['weights']} x {new_paths}; {_HINT}")
        for before, now in zip(old["files"], new["files"]):
            for ext, keys in ((".idx", ("idx_size", "idx_hash")), (".bin", ("bin_size", "bin_hash"))):
                if any(before[k] != now[k] for k in keys):
                    raise UserError(f"data file {now['path']}{ext} changed since {source} was saved (size "
                                    f"{before[keys[0]]} -> {now[keys[0]]} bytes, content hash "
                                    f"{'equal' if before[keys[1]] == now[keys[1]] else 'differs'}); {_HINT}")
