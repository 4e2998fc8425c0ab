"""Start-up cost of the token-id check (megaclm.data.token_range) on a large dataset, cold and cached.

    python bench/token_range.py                   # a 500 MB uint16 .bin (250M tokens) in a temp dir
    python bench/token_range.py --mb 2000 --dir /scratch

cold:   the first run's scan (numpy over the memory-mapped .bin; the file is in the page cache right after
        being written here, so this is the CPU cost, not the disk's: drop caches to see a disk read)
cached: every later start-up (the fingerprint hashes + one small cache entry read)
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megaclm.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from megaclm.data.token_range import token_range  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        prefix = os.path.join(root, "big")
        tokens = args.mb * 10**6 // 2
        rng = np.random.default_rng(0)
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            for _ in range(tokens // 10**7):  # documents of 1000 tokens, 10M tokens per call
                builder.add_documents(rng.integers(0, 50257, 10**7, dtype=np.uint16), np.full(10**4, 1000))
            builder.finalize()
        cache = os.path.join(root, "cache")
        start = time.perf_counter()
        got = token_range(prefix, cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        assert token_range(prefix, cache) == got
        cached = time.perf_counter() - start
        size = os.path.getsize(prefix + ".bin")
        print(f".bin {size / 1e6:.0f} MB, ids {got[0]}..{got[1]}: cold {cold:.3f} s ({size / cold / 1e9:.2f} GB/s), "
              f"cached {cached * 1e3:.1f} ms ({cold / cached:.0f}x faster)")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
