"""Checksum speed for checkpoint manifests: which hash can verify a checkpoint for little next to loading it.

    python bench/checksums.py                 # 512 MiB of random bytes, 3 repeats
    python bench/checksums.py --mib 2048

Hashes one in-memory buffer (no disk: the figure is the hash's own cost) in 16 MiB chunks, as a
streaming writer would, and compares with torch.load of the same bytes saved as a tensor (from the
page cache: the cheapest a load can be). Prints GB/s per hash and each hash's time as a fraction
of the load's. xxhash is measured only if installed (it is not a megaclm dependency).
"""
import argparse
import hashlib
import io
import statistics
import time
import zlib

import torch

CHUNK = 16 << 20


def _stream(update, data: memoryview) -> None:
    for at in range(0, len(data), CHUNK):
        update(data[at:at + CHUNK])


def hashers() -> dict:
    found = {
        "zlib.crc32": lambda data: _crc32(data),
        "hashlib.sha256": lambda data: _stream(hashlib.sha256().update, data),
        "hashlib.blake2b": lambda data: _stream(hashlib.blake2b().update, data),
        "hashlib.md5": lambda data: _stream(hashlib.md5().update, data),
    }
    try:
        import xxhash
        found["xxhash.xxh3_64"] = lambda data: _stream(xxhash.xxh3_64().update, data)
    except ImportError:
        pass
    return found


def _crc32(data: memoryview) -> int:
    crc = 0
    for at in range(0, len(data), CHUNK):
        crc = zlib.crc32(data[at:at + CHUNK], crc)
    return crc


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tensor = torch.randint(0, 256, (args.mib << 20,), dtype=torch.uint8)
    buf = io.BytesIO()
    torch.save(tensor, buf)
    data = memoryview(buf.getvalue())
    load = timed(lambda: torch.load(io.BytesIO(data), weights_only=True), args.repeats)
    gb = len(data) / 1e9
    print(f"{len(data) / 2**20:.0f} MiB; torch.load from memory: {gb / load:.2f} GB/s")
    for name, fn in hashers().items():
        t = timed(lambda: fn(data), args.repeats)
        print(f"{name:18s} {gb / t:6.2f} GB/s   {t / load:5.2f} x torch.load")


if __name__ == "__main__":
    main()
