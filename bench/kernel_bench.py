"""Fused CUDA kernels vs the PyTorch references run eagerly vs torch.compile of the references.

    python bench/kernel_bench.py [--dtype bf16] [--only rms_norm,softmax] [--iters 50] [--json out.json]
    python bench/kernel_bench.py --quick      # tiny shapes on the CPU (eager vs compile): checks the script

Needs a CUDA GPU and the built extension (MEGACLM_CUDA_EXT=1 pip install --no-build-isolation -e .).
Per kernel and implementation, all measured in this one run at Llama-3-8B-like shapes:
  - forward time and forward + backward time (CUDA events, median of --iters after warm-up);
  - achieved bandwidth = the bytes the op must move at least (each input read once, each output
    written once; listed per case) / time, and its share of the HBM peak (--peak-tbs, H100 SXM 3.35);
  - peak memory of one forward + backward above what the inputs hold.
Ratios at the end of each kernel: fused speed-up over eager and over torch.compile (--json keeps
them as "ratios", the measurements as "rows"). The fused
linear cross-entropy is GEMM-bound, so its line reports TFLOP/s instead of bandwidth, and the
issue's memory target (fused peak <= 1/4 of eager at vocab 128,256, 4,096 tokens).
"""
import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megaclm.ops import REFERENCES, _cuda
from megaclm.utils.errors import UserError, cli_main
from megaclm.utils.fileio import atomic_write

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    name: str  # megaclm.ops op name
    make: Callable  # dtype -> (args, indices of args that get gradients)
    fwd_bytes: Callable  # (args, outputs) -> bytes a forward must move
    bwd_bytes: Callable  # (args, outputs) -> bytes a backward must move (reads grads + saved, writes grads)
    flops: Callable | None = None  # for GEMM-bound cases: (args) -> fwd+bwd FLOPs


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


@dataclass(frozen=True)
class Shapes:
    tokens: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    softmax: tuple  # (B, nh, Tq, Tk): a square causal block
    softmax_long: tuple  # (B, nh, Tq, Tk): a few queries over many keys
    ce_rows: int
    lce_tokens: int


# Llama-3-8B-like shapes on the GPU; --quick: tiny ones (odd widths included) that run on the CPU in seconds.
FULL = Shapes(16384, 4096, 32, 8, 128, 14336, 128256, (1, 32, 4096, 4096), (1, 8, 256, 32768), 8192, 4096)
QUICK = Shapes(64, 96, 4, 2, 16, 80, 1000, (1, 4, 33, 33), (1, 2, 4, 257), 64, 32)


def _norm_case(name, s: Shapes, dev, residual, bias):
    def make(dtype):
        x, w = randn(s.tokens, s.hidden, dtype=dtype, device=dev), randn(s.hidden, dtype=dtype, device=dev)
        args = [x] + ([randn(s.tokens, s.hidden, dtype=dtype, device=dev)] if residual else []) + [w]
        args += ([randn(s.hidden, dtype=dtype, device=dev)] if bias else []) + [1e-5]
        return args, set(range(len(args) - 1))

    def fwd(args, outs):  # read x (+ residual) and the weights, write y (+ x + residual)
        return nbytes(*args[:-1], *outs)

    def bwd(args, outs):  # read dy (+ d(x + residual)) and h, write one dx (x and residual share it)
        weights = nbytes(*args[1 + residual:-1])
        return (4 if residual else 3) * nbytes(args[0]) + 2 * weights

    return Case(name, make, fwd, bwd)


def _rope_case(s: Shapes, dev):
    def make(dtype):
        qkv = randn(4, s.tokens // 4, (s.heads + 2 * s.kv_heads) * s.head_dim, dtype=dtype, device=dev)
        inv_freq = 1.0 / 500000 ** (torch.arange(0, s.head_dim, 2, device=dev).float() / s.head_dim)
        positions = torch.arange(s.tokens // 4, device=dev).expand(4, -1)
        return [qkv, inv_freq, positions], {0}

    def both(args, outs):  # q and k in, q and k out (the v third of qkv is not touched)
        return 2 * nbytes(*outs)

    return Case("rope", make, both, both)


def _rope_split(fn, s: Shapes):
    def run(qkv, inv_freq, positions):
        B, T = qkv.shape[:2]
        q, k, _ = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        return fn(q.view(B, T, s.heads, s.head_dim), k.view(B, T, s.kv_heads, s.head_dim), inv_freq, positions)
    return run


def _softmax_case(label, s: Shapes, dev, B, nh, Tq, Tk):
    def make(dtype):
        scores = randn(B, nh, Tq, Tk, dtype=dtype, device=dev, scale=4)
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=dev).tril(Tk - Tq)
        return [scores, causal, 1.0 / math.sqrt(s.head_dim)], {0}

    return Case(label, make, lambda a, o: nbytes(a[0], *o), lambda a, o: 3 * nbytes(a[0]))


def cases(s: Shapes, dev: str) -> list[Case]:
    def ce(dtype):
        logits = randn(s.ce_rows, s.vocab, dtype=dtype, device=dev, scale=2)
        return [logits, torch.randint(0, s.vocab, (s.ce_rows,), device=dev)], {0}

    def lce(dtype):
        h = randn(s.lce_tokens, s.hidden, dtype=dtype, device=dev)
        w = randn(s.vocab, s.hidden, dtype=dtype, device=dev, scale=s.hidden ** -0.5)
        return [h, w, torch.randint(0, s.vocab, (s.lce_tokens,), device=dev), min(1024, s.lce_tokens // 2)], {0, 1}

    return [
        _norm_case("rms_norm", s, dev, residual=False, bias=False),
        _norm_case("add_rms_norm", s, dev, residual=True, bias=False),
        _norm_case("layer_norm", s, dev, residual=False, bias=True),
        _norm_case("add_layer_norm", s, dev, residual=True, bias=True),
        Case("bias_gelu", lambda d: ([randn(s.tokens, 4 * s.hidden, dtype=d, device=dev),
                                      randn(4 * s.hidden, dtype=d, device=dev)], {0, 1}),
             lambda a, o: nbytes(*a, *o), lambda a, o: 3 * nbytes(a[0])),
        Case("swiglu", lambda d: ([randn(s.tokens, 2 * s.ffn, dtype=d, device=dev)], {0}),
             lambda a, o: nbytes(*a, *o), lambda a, o: nbytes(*o) + 2 * nbytes(a[0])),
        _rope_case(s, dev),
        _softmax_case("scaled_masked_softmax", s, dev, *s.softmax),
        _softmax_case("scaled_masked_softmax@long", s, dev, *s.softmax_long),
        Case("cross_entropy", ce, lambda a, o: nbytes(a[0]), lambda a, o: 2 * nbytes(a[0])),
        Case("linear_cross_entropy", lce, lambda a, o: 0, lambda a, o: 0,
             flops=lambda a: 2 * a[0].size(0) * a[1].size(0) * a[0].size(1) * 3),
    ]


def _op(case: Case, impl: str, s: Shapes, compile_backend: str):
    name = case.name.split("@")[0]
    if name == "linear_cross_entropy" and impl != "fused":  # eager = the plain unchunked formula
        def fn(h, w, y, chunk):
            return F.cross_entropy((h @ w.t()).float(), y, reduction="none")
    else:
        fn = getattr(_cuda, name) if impl == "fused" else REFERENCES[name]
    if impl == "compile":
        fn = torch.compile(fn, backend=compile_backend)
    return _rope_split(fn, s) if name == "rope" else fn


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn, iters):
    """Median of `iters` calls after 3 warm-up calls: CUDA events on the GPU, the wall clock on the CPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def measure(case: Case, fn: Callable, dtype, iters: int, peak_tbs: float) -> dict:
    torch.manual_seed(0)
    args, grad_idx = case.make(dtype)
    leaves = [a.detach().requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]
    with torch.no_grad():
        fwd_ms = _time_ms(lambda: fn(*leaves), iters)
    outs = _as_tuple(fn(*leaves))
    grads_out = [torch.randn_like(o) for o in outs]
    inputs = [leaves[i] for i in sorted(grad_idx)]

    def fwd_bwd():
        torch.autograd.grad(_as_tuple(fn(*leaves)), inputs, grads_out)

    total_ms = _time_ms(fwd_bwd, iters)
    peak_mib = None
    if torch.cuda.is_available():  # the CPU allocator keeps no peak
        torch.cuda.synchronize()
        del outs
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        outs = _as_tuple(fn(*leaves))
    row = {"fwd_ms": fwd_ms, "total_ms": total_ms, "peak_mib": peak_mib}
    if case.flops is not None:
        row["tflops"] = case.flops(args) / (total_ms * 1e-3) / 1e12
    else:
        fwd_b, bwd_b = case.fwd_bytes(leaves, outs), case.bwd_bytes(leaves, outs)
        row["fwd_gbs"] = fwd_b / (fwd_ms * 1e-3) / 1e9
        row["bwd_gbs"] = bwd_b / (max(total_ms - fwd_ms, 1e-6) * 1e-3) / 1e9
        row["fwd_peak"], row["bwd_peak"] = row["fwd_gbs"] / (peak_tbs * 1e3), row["bwd_gbs"] / (peak_tbs * 1e3)
    return row


def _mib(value):
    return "n/a" if value is None else f"{value:.0f}"


def _print_row(kernel: str, impl: str, r: dict):
    if "tflops" in r:
        print(f"{kernel:<26} {impl:<8} {r['fwd_ms']:8.3f} {'':>9} {'':>6} {r['total_ms']:8.3f} "
              f"{r['tflops']:6.1f} TFLOP/s {_mib(r['peak_mib']):>9}")
    else:
        print(f"{kernel:<26} {impl:<8} {r['fwd_ms']:8.3f} {r['fwd_gbs']:9.0f} {r['fwd_peak']:6.0%} "
              f"{r['total_ms']:8.3f} {r['bwd_gbs']:9.0f} {r['bwd_peak']:6.0%} {_mib(r['peak_mib']):>9}")


def ratio_row(kernel: str, ours: str, other: str, rows: dict) -> dict:
    """Speed-up of `ours` over `other` (> 1: ours is faster) and its peak memory as a share of other's."""
    o, f = rows[other], rows[ours]
    memory = None if f["peak_mib"] is None else f["peak_mib"] / max(o["peak_mib"], 1e-9)
    return {"kernel": kernel, "impl": ours, "vs": other, "fwd_speedup": o["fwd_ms"] / f["fwd_ms"],
            "fwd_bwd_speedup": o["total_ms"] / f["total_ms"], "peak_memory_ratio": memory}


def _impls(args) -> list[str]:
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - {"fused", "eager", "compile"} or not impls:
        raise UserError(f"--impls {args.impls!r}: use a comma-separated subset of fused,eager,compile")
    if "fused" in impls and not _cuda.is_available():
        if not args.quick:
            raise UserError(f"the fused kernels are not usable: {_cuda.unavailable_reason()}")
        print(f"fused: skipped ({_cuda.unavailable_reason()})")
        impls.remove("fused")
    return impls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="Tiny shapes on the CPU, fused kernels only if usable (checks the script).")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--only", default="", help="Comma-separated case names (default: all).")
    parser.add_argument("--iters", type=int, default=None, help="Timed calls per measurement (default 50; 3 quick).")
    parser.add_argument("--peak-tbs", type=float, default=3.35, help="HBM peak in TB/s (H100 SXM: 3.35).")
    parser.add_argument("--impls", default="fused,eager,compile")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; 'eager' with --quick).")
    parser.add_argument("--json", default=None, help="Also write the results here (rewritten after every kernel).")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        raise UserError("bench/kernel_bench.py needs a CUDA GPU and none is visible; run it on the GPU machine "
                        "(or pass --quick for the CPU check)")
    iters = args.iters or (3 if args.quick else 50)
    compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    shapes, dev = (QUICK, "cpu") if args.quick else (FULL, "cuda")
    table = cases(shapes, dev)
    names = {c.name for c in table}
    only = [n for n in args.only.split(",") if n]
    if set(only) - names:
        raise UserError(f"--only {','.join(sorted(set(only) - names))}: unknown; cases are {', '.join(sorted(names))}")
    impls = _impls(args)
    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"{device_name}  dtype {args.dtype}  HBM peak {args.peak_tbs} TB/s  torch {torch.__version__}  "
          f"compile backend {compile_backend}")
    print(f"{'kernel':<26} {'impl':<8} {'fwd ms':>8} {'fwd GB/s':>9} {'%peak':>6} {'f+b ms':>8} {'bwd GB/s':>9} "
          f"{'%peak':>6} {'peak MiB':>9}")
    out = {"device": device_name, "dtype": args.dtype, "peak_tbs": args.peak_tbs, "compile_backend": compile_backend,
           "shapes": asdict(shapes), "impls": impls, "rows": [], "ratios": []}
    for case in table:
        if only and case.name not in only:
            continue
        rows = {}
        for impl in impls:
            rows[impl] = measure(case, _op(case, impl, shapes, compile_backend), dtype, iters, args.peak_tbs)
            _print_row(case.name, impl, rows[impl])
            out["rows"].append({"kernel": case.name, "impl": impl, **rows[impl]})
        for other in impls[1:]:  # the first implementation (fused when usable) against each other one
            r = ratio_row(case.name, impls[0], other, rows)
            out["ratios"].append(r)
            memory = "n/a" if r["peak_memory_ratio"] is None else f"{r['peak_memory_ratio']:.2f}x"
            print(f"{'':<26} {impls[0]} vs {other}: fwd x{r['fwd_speedup']:.2f}, "
                  f"fwd+bwd x{r['fwd_bwd_speedup']:.2f}, peak memory {memory}")
        if args.json:  # after every kernel, so a run stopped by its time budget keeps what it measured
            with atomic_write(args.json, "w") as fh:
                json.dump(out, fh, indent=1)
        if dev == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    cli_main(main)
