"""Index-build benchmark: C++ helpers vs the numpy fallback vs a plain Python loop (the baseline).

    python bench/indices.py                  # 10M documents / ~1B tokens; 1,000 datasets x 10M samples

1. Sample index of a GPTDataset over 10M documents (sizes uniform in 1..199, ~1B tokens, seq 2048,
   one epoch): `build_sample_index` alone for each backend, then the whole cache-miss cost with
   C++ (document index shuffle + sample index + shuffle index + writing the cache files).
2. Blending index of 1,000 datasets (Zipf weights) x 10M samples, each backend.
The Python loop is linear in its input; where it would run for minutes it runs on a slice
(--python-fraction) and the time is scaled up, which the output says. Outputs are checked equal.
"""
import argparse
import tempfile
import time

import numpy as np

from megaclm.data import helpers
from megaclm.data.cache import IndexCache
from megaclm.data.gpt_dataset import build_gpt_indices


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def report(title, rows):
    base = rows[-1][1]
    print(f"\n{title}")
    for name, seconds, note in rows:
        print(f"  {name:<8} {seconds:9.2f} s   x{base / seconds:8.1f} vs python loop{note}")


def bench_sample_index(docs: int, seq: int, python_fraction: float):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 200, docs, dtype=np.int32)
    doc_index = rng.permutation(docs).astype(np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    n = (tokens - 1) // seq
    print(f"sample index: {docs:,} documents, {tokens:,} tokens, seq {seq} -> {n:,} samples")
    t_cpp, ref = timed(helpers.build_sample_index, sizes, doc_index, seq, n, impl="cpp")
    t_np, out = timed(helpers.build_sample_index, sizes, doc_index, seq, n, impl="numpy")
    assert np.array_equal(ref, out)
    part = max(1, int(docs * python_fraction))
    part_tokens = int(sizes[doc_index[:part]].sum(dtype=np.int64))
    t_py, out = timed(helpers.build_sample_index, sizes, doc_index[:part], seq, (part_tokens - 1) // seq, impl="python")
    assert np.array_equal(out, ref[:len(out)])
    scale = docs / part
    report("sample index (build_sample_index)", [
        ("cpp", t_cpp, ""), ("numpy", t_np, ""),
        ("python", t_py * scale, f"   (ran on {part:,} documents, x{scale:.0f})" if scale > 1 else "")])
    with tempfile.TemporaryDirectory() as d:
        cache = IndexCache(d)
        start = time.perf_counter()
        arrays = build_gpt_indices(sizes, np.arange(docs, dtype=np.int32), seq, n, seed=1234, impl="cpp")
        t_build = time.perf_counter() - start
        cache.save(d, "GPTDataset-train", {"bench": docs}, arrays)
        t_total = time.perf_counter() - start
    print(f"  full GPTDataset index build with C++ (shuffles + indices): {t_build:.2f} s; "
          f"+ cache write: {t_total:.2f} s  (target < 10 s)")


def bench_blend(datasets: int, samples: int, python_fraction: float):
    weights = 1.0 / np.arange(1, datasets + 1)
    tree = helpers.blending_tree(weights)
    print(f"\nblending index: {datasets:,} datasets (Zipf weights), {samples:,} samples, "
          f"stated bound max B_d = {tree.bounds.max():.3f} samples")
    t_cpp, ref = timed(helpers.build_blending_index, tree, samples, impl="cpp")
    t_np, out = timed(helpers.build_blending_index, tree, samples, impl="numpy")
    assert np.array_equal(ref[0], out[0]) and np.array_equal(ref[1], out[1])
    part = max(1, int(samples * python_fraction))
    t_py, out = timed(helpers.build_blending_index, tree, part, impl="python")
    assert np.array_equal(out[0], ref[0][:part])
    scale = samples / part
    report("blending index (build_blending_index)", [
        ("cpp", t_cpp, ""), ("numpy", t_np, ""),
        ("python", t_py * scale, f"   (ran on {part:,} samples, x{scale:.0f})" if scale > 1 else "")])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=10_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--datasets", type=int, default=1000)
    p.add_argument("--blend-samples", type=int, default=10_000_000)
    p.add_argument("--python-fraction", type=float, default=0.1,
                   help="share of the input the Python loop runs on (its time is scaled up)")
    args = p.parse_args()
    if helpers._cpp is None:
        raise SystemExit("the C++ helpers are not built: run `pip install -e .` first")
    bench_sample_index(args.docs, args.seq_length, args.python_fraction)
    bench_blend(args.datasets, args.blend_samples, args.python_fraction)


if __name__ == "__main__":
    main()
