"""Checkpoint manifests: every file of a tag with its size and checksum, and which tag a run can load.

    <tag>/megaclm/manifest.json   {"algorithm": "xxh3_64", "files": {relative path: {"size", "checksum"}}}

It is written after every other file of the tag and before `megaclm/meta.json` (which it lists too,
from the bytes about to be written), so a complete tag always has one. The files are hashed while
they are written (`HashingFile`, used by megaclm.checkpoint.async_save.write_files: each rank hashes
what it writes, rank 0 gathers the entries); files written behind megaclm's back (DeepSpeed's copy of
zero_to_fp32.py) are hashed by rank 0 from disk (`write_manifest`).

Checksum: xxHash's XXH3-64 (bench/checksums.py on this project's CPU machine: 24 GB/s, vs 3.1 for
zlib.crc32, 1.8 for sha256, 0.8 for blake2b, and 0.8 GB/s for torch.load of the same bytes from
memory): verifying costs ~3% of loading. It guards against damage (bit flips, truncation, a file
of another save), not against an adversary.

Which tag a run loads (`choose_tag`, once per run, before any process group):
  - `--ckpt-step N`: iter_N (`best`: the tag <dir>/best records), or a UserError naming what is wrong with it;
  - else `latest`'s tag, or, without `latest`, the newest tag on disk; if it is incomplete (no
    meta.json: an interrupted save), misses a file or has a file of the wrong size, the next older
    complete tag whose files are all there, with a WARNING naming both. Directories without meta.json
    are ignored (and removed by the next save); a directory with complete tags but none loadable is
    refused, never trained over. Checksums are compared later, by all ranks together
    (megaclm.checkpoint.deepspeed_ckpt.verify_checksums), which may reject the choice and ask again.
A tag without a manifest (written before manifests existed) loads unverified, with one info line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import IO, Any, Callable

import xxhash

from megaclm.checkpoint.layout import (LATEST, MANIFEST, META, is_complete, iteration_of, read_latest, tag_at_step,
                                      tags_on_disk)
from megaclm.logging import get_logger
from megaclm.utils.errors import UserError
from megaclm.utils.fileio import atomic_write

log = get_logger("megaclm.checkpoint")

ALGORITHM = "xxh3_64"
_CHUNK = 16 << 20


def read_file(path: str, read: Callable[[], Any]) -> Any:
    """`read()`, with a failure reported as a UserError naming `path`."""
    try:
        return read()
    except Exception as e:  # torch/pickle/zip errors of a damaged file, OSError of a missing one
        raise UserError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); it is damaged or "
                        "truncated: restore it, or load an older checkpoint (--ckpt-step)") from e


class HashingFile:
    """A write-only file object that checksums and counts what passes through it (for torch.save)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.size, self._hash = f, 0, xxhash.xxh3_64()

    def write(self, data) -> int:
        n = self.f.write(data)
        self._hash.update(data)
        self.size += len(memoryview(data).cast("B"))
        return n

    def flush(self) -> None:
        self.f.flush()

    def entry(self) -> dict:
        return {"size": self.size, "checksum": self._hash.hexdigest()}


def torch_load(path: str, mmap: bool = False) -> Any:
    """torch.load of a checkpoint file onto the CPU; a damaged file is a UserError naming it (read_file)."""
    import torch  # here, not at the top: the manifest's other readers need no torch

    return read_file(path, lambda: torch.load(path, map_location="cpu", weights_only=False, mmap=mmap))


def bytes_entry(data: bytes) -> dict:
    return {"size": len(data), "checksum": xxhash.xxh3_64_hexdigest(data)}


def file_entry(path: str) -> dict:
    h, size = xxhash.xxh3_64(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "checksum": h.hexdigest()}


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # megaclm.utils.fileio.temp_path_for


def write_manifest(ckpt: str, entries: dict[str, dict], pending: dict[str, bytes]) -> None:
    """Write `ckpt`/megaclm/manifest.json: `entries` (hashed while written), every other file found in
    `ckpt` (hashed now), and `pending` {relative path: bytes written after the manifest (meta.json)}."""
    files = dict(entries)
    for root, _, names in os.walk(ckpt):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), ckpt)
            if rel not in files and rel not in pending and rel != MANIFEST and not _is_temp(name):
                files[rel] = file_entry(os.path.join(ckpt, rel))
    files.update({rel: bytes_entry(data) for rel, data in pending.items()})
    with atomic_write(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump({"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}, f, indent=1)


def read_manifest(ckpt: str) -> dict | None:
    """The manifest's {relative path: entry}, or None for a checkpoint written before manifests."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest["algorithm"] != ALGORITHM:
            raise ValueError(f"checksum algorithm {manifest['algorithm']!r}, not {ALGORITHM!r}")
        return manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{path} cannot be read ({e})") from None


class DamagedCheckpoint(Exception):
    """What is wrong with one tag (its message names the file)."""


def check_sizes(ckpt: str) -> None:
    """Raise DamagedCheckpoint unless every file the manifest lists is there with its size."""
    for rel, entry in (read_manifest(ckpt) or {}).items():
        path = os.path.join(ckpt, rel)
        if not os.path.isfile(path):
            raise DamagedCheckpoint(f"{path} is missing")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise DamagedCheckpoint(f"{path} has {size} bytes, the manifest says {entry['size']} (truncated or "
                                    "overwritten)")


def check_checksums(ckpt: str, files: list[str], entries: dict[str, dict]) -> str | None:
    """The first of `files` whose checksum differs from the manifest's, as a sentence; None if all match."""
    for rel in files:
        path = os.path.join(ckpt, rel)
        try:
            got = file_entry(path)
        except OSError as e:
            return f"{path} cannot be read ({e})"
        if got != entries[rel]:
            return f"{path} has checksum {got['checksum']} ({got['size']} bytes), the manifest says " \
                   f"{entries[rel]['checksum']} ({entries[rel]['size']} bytes): its content is damaged"
    return None


def share_of(entries: dict[str, dict], rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` checksums: largest first, dealt round-robin (about equal bytes)."""
    by_size = sorted(entries, key=lambda rel: (-entries[rel]["size"], rel))
    return by_size[rank::world]


@dataclass
class Choice:
    """The tag a run loads and why; `rejected` {tag: what is wrong} holds the newer tags passed over."""

    tag: str | None
    pinned: bool = False
    rejected: dict[str, str] = field(default_factory=dict)
    partial: list[str] = field(default_factory=list)
    no_latest: bool = False

    def report(self, load_dir: str) -> list[tuple[str, str]]:
        """(level, message) lines for the log: loudly when it fell back."""
        lines = [("info", f"--load {load_dir}: ignoring {t} (no {META}: a save that did not finish)")
                 for t in self.partial]
        if self.no_latest and self.tag is not None:
            lines.append(("warning", f"--load {load_dir} has no `{LATEST}` file; resuming from the newest complete "
                                     f"checkpoint there, {self.tag}"))
        for bad, why in self.rejected.items():
            lines.append(("warning", f"checkpoint {os.path.join(load_dir, bad)} is damaged or incomplete: {why}; "
                                     f"falling back to {self.tag}"))
        if self.tag is not None and read_manifest(os.path.join(load_dir, self.tag)) is None:
            lines.append(("info", f"checkpoint {os.path.join(load_dir, self.tag)} has no manifest (written before "
                                  "megaclm checked checkpoints); loading it unverified"))
        return lines


def choose_tag(load_dir: str, ckpt_step: int | str | None, rejected: dict[str, str] | None = None) -> Choice:
    """The tag to load from `load_dir` (see the module docstring); `rejected` {tag: why} are tags already
    found damaged (by checksum) that must be passed over. Tag None: nothing to load (a fresh start)."""
    rejected = dict(rejected or {})
    if ckpt_step is not None:
        tag = tag_at_step(load_dir, ckpt_step)
        why = rejected.get(tag) or _problem(load_dir, tag)
        if why is not None:
            raise UserError(f"--ckpt-step {ckpt_step}: checkpoint {os.path.join(load_dir, tag)} cannot be loaded: "
                            f"{why}; pick another --ckpt-step, or drop it to load the newest intact checkpoint")
        return Choice(tag, pinned=True)
    latest = read_latest(load_dir)
    if latest is not None and iteration_of(latest) is None:
        raise UserError(f"{os.path.join(load_dir, LATEST)} names {latest!r}, not a checkpoint tag (iter_NNNNNNN); "
                        "write the tag to load into it, or pass --ckpt-step")
    on_disk = tags_on_disk(load_dir)
    complete = [t for t in on_disk if is_complete(load_dir, t)]
    partial = [t for t in on_disk if t not in complete and t != latest]
    if latest is None and not complete:
        return Choice(None, partial=partial)
    newest = latest or complete[0]
    candidates = [newest] + [t for t in complete if iteration_of(t) < iteration_of(newest)]
    for tag in candidates:
        why = rejected.get(tag) or _problem(load_dir, tag)
        if why is None:
            return Choice(tag, rejected={t: w for t, w in rejected.items() if t != tag}, partial=partial,
                          no_latest=latest is None)
        rejected[tag] = why
    raise UserError(f"--load {load_dir}: no intact checkpoint to resume from (" + "; ".join(
        f"{t}: {w}" for t, w in rejected.items()) + "); restore one, or --load another directory (a run never "
        "starts from scratch over existing checkpoints)")


def _problem(load_dir: str, tag: str) -> str | None:
    """Why `tag` cannot be loaded, judged from names and sizes only (cheap); None if it can."""
    ckpt = os.path.join(load_dir, tag)
    if not os.path.isdir(ckpt):
        return f"{ckpt} does not exist"
    if not is_complete(load_dir, tag):
        return f"{os.path.join(ckpt, META)} is missing: the save did not finish"
    try:
        check_sizes(ckpt)
    except DamagedCheckpoint as e:
        return str(e)
    return None
