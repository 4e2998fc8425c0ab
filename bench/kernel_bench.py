"""Fused CUDA kernels vs the PyTorch references run eagerly vs torch.compile of the references.

    python bench/kernel_bench.py [--dtype bf16] [--only rms_norm,softmax] [--iters 50]

Needs a CUDA GPU and the built extension (MEGACLM_CUDA_EXT=1 pip install --no-build-isolation -e .).
Per kernel and implementation, all measured in this one run at Llama-3-8B-like shapes:
  - forward time and forward + backward time (CUDA events, median of --iters after warm-up);
  - achieved bandwidth = the bytes the op must move at least (each input read once, each output
    written once; listed per case) / time, and its share of the HBM peak (--peak-tbs, H100 SXM 3.35);
  - peak memory of one forward + backward above what the inputs hold.
Ratios at the end of each kernel: fused speed-up over eager and over torch.compile. The fused
linear cross-entropy is GEMM-bound, so its line reports TFLOP/s instead of bandwidth, and the
issue's memory target (fused peak <= 1/4 of eager at vocab 128,256, 4,096 tokens).
"""
import argparse
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megaclm.ops import REFERENCES, _cuda
from megaclm.utils.errors import UserError, cli_main

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


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 16384, 4096, 32, 8, 128, 14336, 128256


def _norm_case(name, residual, bias):
    def make(dtype):
        x, w = randn(TOKENS, HIDDEN, dtype=dtype), randn(HIDDEN, dtype=dtype)
        args = [x] + ([randn(TOKENS, HIDDEN, dtype=dtype)] if residual else []) + [w]
        args += ([randn(HIDDEN, dtype=dtype)] if bias else []) + [1e-5]
        return args, set(range(len(args) - 1))

    def fwd(args, outs):  # read x (+ residual) and the weights, write y (+ x + residual)
        return nbytes(*args[:-1], *outs)

    def bwd(args, outs):  # read dy (+ d(x + residual)) and h, write one dx (x and residual share it)
        weights = nbytes(*args[1 + residual:-1])
        return (4 if residual else 3) * nbytes(args[0]) + 2 * weights


    return Case(name, make, fwd, bwd)


def _rope_make(dtype):
    qkv = randn(4, TOKENS // 4, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    inv_freq = 1.0 / 500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    positions = torch.arange(TOKENS // 4, device="cuda").expand(4, -1)
    return [qkv, inv_freq, positions], {0}


def _rope_split(fn):
    def run(qkv, inv_freq, positions):
        B, T = qkv.shape[:2]
        q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        return fn(q.view(B, T, HEADS, HEAD_DIM), k.view(B, T, KV_HEADS, HEAD_DIM), inv_freq, positions)
    return run


def _rope_bytes(args, outs):  # q and k in, q and k out (the v third of qkv is not touched)
    return 2 * nbytes(*outs)


def _softmax_case(label, B, nh, Tq, Tk):
    def make(dtype):
        scores = randn(B, nh, Tq, Tk, dtype=dtype, scale=4)
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device="cuda").tril(Tk - Tq)
        return [scores, causal, 1.0 / math.sqrt(HEAD_DIM)], {0}

    return Case(label, make, lambda a, o: nbytes(a[0], *o), lambda a, o: 3 * nbytes(a[0]))


def _ce_make(dtype):
    logits = randn(8192, VOCAB, dtype=dtype, scale=2)
    return [logits, torch.randint(0, VOCAB, (8192,), device="cuda")], {0}


def _lce_make(dtype):
    tokens, hidden = 4096, HIDDEN
    h = randn(tokens, hidden, dtype=dtype)
    w = randn(VOCAB, hidden, dtype=dtype, scale=hidden ** -0.5)
    return [h, w, torch.randint(0, VOCAB, (tokens,), device="cuda"), 1024], {0, 1}


CASES = [
    _norm_case("rms_norm", residual=False, bias=False),
    _norm_case("add_rms_norm", residual=True, bias=False),
    _norm_case("layer_norm", residual=False, bias=True),
    _norm_case("add_layer_norm", residual=True, bias=True),
    Case("bias_gelu", lambda d: ([randn(TOKENS, 4 * HIDDEN, dtype=d), randn(4 * HIDDEN, dtype=d)], {0, 1}),
         lambda a, o: nbytes(*a, *o), lambda a, o: 3 * nbytes(a[0])),
    Case("swiglu", lambda d: ([randn(TOKENS, 2 * FFN, dtype=d)], {0}),
         lambda a, o: nbytes(*a, *o), lambda a, o: nbytes(*o) + 2 * nbytes(a[0])),
    Case("rope", _rope_make, _rope_bytes, _rope_bytes),
    _softmax_case("scaled_masked_softmax", 1, HEADS, 4096, 4096),
    _softmax_case("scaled_masked_softmax@32k", 1, 8, 256, 32768),
    Case("cross_entropy", _ce_make, lambda a, o: nbytes(a[0]), lambda a, o: 2 * nbytes(a[0])),
    Case("linear_cross_entropy", _lce_make, lambda a, o: 0, lambda a, o: 0,
         flops=lambda a: 2 * a[0].size(0) * a[1].size(0) * a[0].size(1) * 3),
]


def _op(case: Case, impl: str):
    name = case.name.split("@")[0]
    fn = {"fused": getattr(_cuda, name), "eager": REFERENCES[name]}.get(impl)
    if impl == "compile":
        fn = torch.compile(REFERENCES[name])
    if name == "rope":
        fn = _rope_split(fn)
    if name == "linear_cross_entropy" and impl != "fused":  # eager = the plain unchunked formula
        def fn(h, w, y, chunk):
            return F.cross_entropy((h @ w.t()).float(), y, reduction="none")
        fn = torch.compile(fn) if impl == "compile" else fn
    return fn


def _time_ms(fn, iters):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def measure(case: Case, impl: str, dtype, iters: int, peak_tbs: float) -> dict:
    torch.manual_seed(0)
    args, grad_idx = case.make(dtype)
    fn = _op(case, impl)
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
    torch.cuda.synchronize()
    del outs
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    outs = _as_tuple(fn(*leaves))
    row = {"fwd_ms": fwd_ms, "total_ms": total_ms, "peak_mib": peak / 2**20}
    if case.flops is not None:
        row["tflops"] = case.flops(args) / (total_ms * 1e-3) / 1e12
    else:
        fwd_b, bwd_b = case.fwd_bytes(leaves, outs), case.bwd_bytes(leaves, outs)
        row["fwd_gbs"] = fwd_b / (fwd_ms * 1e-3) / 1e9
        row["bwd_gbs"] = bwd_b / (max(total_ms - fwd_ms, 1e-6) * 1e-3) / 1e9
        row["fwd_peak"], row["bwd_peak"] = row["fwd_gbs"] / (peak_tbs * 1e3), row["bwd_gbs"] / (peak_tbs * 1e3)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--only", default="", help="Comma-separated case names (default: all).")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--peak-tbs", type=float, default=3.35, help="HBM peak in TB/s (H100 SXM: 3.35).")
    parser.add_argument("--impls", default="fused,eager,compile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise UserError("bench/kernel_bench.py needs a CUDA GPU and none is visible; run it on the GPU machine")
    if not _cuda.is_available():
        raise UserError(f"the fused kernels are not usable: {_cuda.unavailable_reason()}")
    names = {c.name for c in CASES}
    only = [n for n in args.only.split(",") if n]
    if set(only) - names:
        raise UserError(f"--only {','.join(sorted(set(only) - names))}: unknown; cases are {', '.join(sorted(names))}")
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - {"fused", "eager", "compile"} or not impls:
        raise UserError(f"--impls {args.impls!r}: use a comma-separated subset of fused,eager,compile")
    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}  dtype {args.dtype}  HBM peak {args.peak_tbs} TB/s  "
          f"torch {torch.__version__}")
    print(f"{'kernel':<26} {'impl':<8} {'fwd ms':>8} {'fwd GB/s':>9} {'%peak':>6} {'f+b ms':>8} {'bwd GB/s':>9} "
          f"{'%peak':>6} {'peak MiB':>9}")
    for case in CASES:
        if only and case.name not in only:
            continue
        rows = {}
        for impl in impls:
            rows[impl] = r = measure(case, impl, dtype, args.iters, args.peak_tbs)
            if "tflops" in r:
                print(f"{case.name:<26} {impl:<8} {r['fwd_ms']:8.3f} {'':>9} {'':>6} {r['total_ms']:8.3f} "
                      f"{r['tflops']:6.0f} TFLOP/s {r['peak_mib']:9.0f}")
            else:
                print(f"{case.name:<26} {impl:<8} {r['fwd_ms']:8.3f} {r['fwd_gbs']:9.0f} {r['fwd_peak']:6.0%} "
                      f"{r['total_ms']:8.3f} {r['bwd_gbs']:9.0f} {r['bwd_peak']:6.0%} {r['peak_mib']:9.0f}")
        if "fused" in rows:
            f = rows["fused"]
            for other in [i for i in impls if i != "fused"]:
                o = rows[other]
                memory = f["peak_mib"] / max(o["peak_mib"], 1e-9)
                print(f"{'':<26} fused vs {other}: fwd x{o['fwd_ms'] / f['fwd_ms']:.2f}, "
                      f"fwd+bwd x{o['total_ms'] / f['total_ms']:.2f}, peak memory {memory:.2f}x")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    cli_main(main)
