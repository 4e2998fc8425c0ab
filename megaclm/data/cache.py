"""On-disk cache of index arrays, safe under many ranks and nodes racing to build it.

    cache = IndexCache(primary_dir)          # e.g. --data-cache-path, or a 'cache' dir beside the dataset
    arrays, built = cache.get_or_build("GPTDataset-train", description, build_fn)

`description` is a JSON-able dict saying everything the arrays depend on; its md5 is the key.
One entry in a directory is

    {md5}-{name}-{array}.npy       one file per array (np.save format, memory-mapped on load)
    {md5}-{name}-description.json  {"description": ..., "files": {array: {"bytes", "crc32", "dtype", "shape"}}}
    {md5}-{name}.lock              flock(2) target; left in place (removing it would race)

Protocol:
- Every file appears atomically (temp name in the same directory, then rename), arrays first and
  the JSON last, so a reader that finds the JSON finds complete arrays; two processes that build at
  once (even on a file system without locks) both end with valid, identical files.
- Building takes an exclusive flock on the .lock file: the first process of a shared directory
  builds, the others wait, then find the JSON and load (no torch.distributed needed; a dead
  builder's lock is released by the kernel). Without flock support it builds unlocked, with a warning.
- Loading checks each array's size and crc32 against the JSON; a corrupt or truncated file is
  reported and rebuilt.
- A directory that is missing and cannot be created, or is not writable, is still read if it holds
  the entry (e.g. prebuilt by tools/build_data_indices.py); otherwise the entry is built in a
  node-local temp directory (`fallback_dir()`), with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
import zlib
from typing import Callable, Iterator

import numpy as np

from megaclm.logging import get_logger, warn_once
from megaclm.utils.errors import UserError
from megaclm.utils.fileio import remove_quietly, temp_path_for

log = get_logger("megaclm.data")

DEFAULT_WAIT_S = 4 * 3600.0  # how long to wait for another process's build before giving up


def description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def fallback_dir() -> str:
    """Node-local directory for caches that cannot be written where they belong."""
    return os.path.join(tempfile.gettempdir(), f"megaclm-index-cache-{os.getuid()}")


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _save_array(path: str, array: np.ndarray) -> dict:
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        meta = {"bytes": os.path.getsize(tmp), "crc32": _crc32(tmp), "dtype": np.dtype(array.dtype).str,
                "shape": list(array.shape)}
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return meta


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def mmap_reference(array: np.ndarray):
    """A picklable stand-in for a cached array: its file name when memory-mapped, else the array."""
    filename = getattr(array, "filename", None)
    return ("npy", filename) if filename is not None else ("array", array)


def from_mmap_reference(ref) -> np.ndarray:
    kind, value = ref
    return np.load(value, mmap_mode="r", allow_pickle=False) if kind == "npy" else value


class IndexCache:
    """Cache entries live in `primary_dir`; see the module docstring for the protocol."""

    def __init__(self, primary_dir: str, wait_s: float = DEFAULT_WAIT_S, poll_s: float = 0.5):
        self.primary_dir = os.path.abspath(primary_dir)
        self.wait_s = wait_s
        self.poll_s = poll_s

    def paths(self, directory: str, name: str, description: dict) -> tuple[str, str]:
        """(JSON path, path prefix of the entry's files) in `directory`."""
        prefix = os.path.join(directory, f"{description_hash(description)}-{name}")
        return prefix + "-description.json", prefix

    def load(self, directory: str, name: str, description: dict) -> dict[str, np.ndarray] | None:
        """The entry's arrays (memory-mapped), or None when absent or corrupt (then logged)."""
        json_path, prefix = self.paths(directory, name, description)
        if not os.path.isfile(json_path):
            return None
        problem = None
        try:
            with open(json_path, encoding="utf-8") as f:
                manifest = json.load(f)
            if manifest.get("description") != json.loads(json.dumps(description)):
                problem = "its description differs (hash collision or edited file)"
            arrays = {}
            for key, meta in (manifest.get("files") or {}).items() if problem is None else ():
                path = f"{prefix}-{key}.npy"
                if not os.path.isfile(path):
                    problem = f"{path} is missing"
                    break
                if os.path.getsize(path) != meta["bytes"] or _crc32(path) != meta["crc32"]:
                    problem = f"{path} is corrupt (size or crc32 mismatch)"
                    break
                arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
                if list(arrays[key].shape) != meta["shape"] or arrays[key].dtype.str != meta["dtype"]:
                    problem = (f"{path} holds {arrays[key].dtype} {arrays[key].shape}, "
                               f"not {meta['dtype']} {meta['shape']}")
                    break
            if problem is None and not arrays:
                problem = "it lists no arrays"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problem = f"it cannot be read ({e})"
        if problem is not None:
            log.warning(f"index cache {json_path}: {problem}; rebuilding it")
            return None
        return arrays

    def save(self, directory: str, name: str, description: dict, arrays: dict[str, np.ndarray]) -> None:
        json_path, prefix = self.paths(directory, name, description)
        files = {key: _save_array(f"{prefix}-{key}.npy", a) for key, a in arrays.items()}
        tmp = temp_path_for(json_path)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"description": description, "files": files}, f, indent=2, sort_keys=True)
            os.replace(tmp, json_path)
        except BaseException:
            remove_quietly(tmp)
            raise

    @contextlib.contextmanager
    def _lock(self, directory: str, name: str, description: dict) -> Iterator[None]:
        _, prefix = self.paths(directory, name, description)
        path = prefix + ".lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            deadline = time.monotonic() + self.wait_s
            waiting = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        # ENOLCK / EOPNOTSUPP: the file system has no locks. Atomic renames keep
                        # racing builders correct; they only duplicate work.
                        warn_once(f"no-flock:{directory}", f"index cache {directory}: file locks unsupported ({e}); "
                                  "ranks may build the same index at once (still safe)", log)
                        break
                    if not waiting:
                        log.info(f"waiting for another process to build {os.path.basename(prefix)} in {directory}")
                        waiting = True
                    if time.monotonic() > deadline:
                        raise UserError(f"index cache {path}: another process has held the lock for over "
                                        f"{self.wait_s:.0f} s; if no run is building it, delete the lock file")
                    time.sleep(self.poll_s)
            yield
        finally:
            os.close(fd)  # releases the flock

    def get_or_build(self, name: str, description: dict,
                     build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
        """(arrays, whether this process built them). Arrays come back memory-mapped from the cache."""
        arrays = self.load(self.primary_dir, name, description)
        if arrays is not None:
            return arrays, False
        directory = self.primary_dir
        if not _writable_dir(directory):
            directory = fallback_dir()
            warn_once(f"cache-fallback:{self.primary_dir}",
                      f"index cache directory {self.primary_dir} is missing or not writable; using node-local "
                      f"{directory} instead (set --data-cache-path to a writable shared directory)", log)
            if not _writable_dir(directory):
                raise UserError(f"neither {self.primary_dir} nor {directory} is a writable directory for the "
                                "index cache; set --data-cache-path to a writable directory")
            arrays = self.load(directory, name, description)
            if arrays is not None:
                return arrays, False
        with self._lock(directory, name, description):
            # Another process may have finished the build while we waited for the lock.
            arrays = self.load(directory, name, description)
            if arrays is not None:
                return arrays, False
            start = time.perf_counter()
            self.save(directory, name, description, build())
            log.debug(f"built index cache {name} in {directory} ({time.perf_counter() - start:.2f} s)")
            arrays = self.load(directory, name, description)
        if arrays is None:
            raise RuntimeError(f"index cache {name} in {directory} could not be read back after building it")
        return arrays, True
