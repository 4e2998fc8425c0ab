"""Atomic file creation: write under a temporary name in the same directory, then rename.

A reader (or a crashed writer's successor) therefore sees either no file or a complete one,
never a truncated file under its final name. rename() is atomic on POSIX within one filesystem.
"""
import contextlib
import os
import tempfile
from typing import IO, Iterator


def temp_path_for(path: str) -> str:
    """A unique temporary name beside `path` (same directory, so the final rename is atomic)."""
    d, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=d)
    # mkstemp makes the file 0600; give it the mode open() would, so the renamed file is
    # readable by whoever the umask allows (datasets and checkpoints are shared on clusters).
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_write(p) as f: f.write(...)` - `p` appears only if the block completes."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):  # name the caller's file
            raise OSError(e.errno, e.strerror, path) from e
        raise


def remove_quietly(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)
