#!/usr/bin/env python
"""Measure a hardware profile (megaclm/planner/hardware.py) on the machine at hand, for tools/plan_layout.py --gpu.

    python bench/profile_hardware.py --out cpu.json            # CPU: torch matmul/attention, gloo between 2 ranks
    python bench/profile_hardware.py --out h100.json --peak-tflops 989.4 --base h100-80gb   # on a GPU

What is measured, on the first CUDA device if there is one, else the CPU (dtype bf16 on a GPU, fp32 on a CPU):
  matmul     a (tokens x h) @ (h x 4h) GEMM forward and backward: FLOP/s
  attention  causal scaled_dot_product_attention forward and backward, counted as the MFU numerator counts it
             (4 * T^2 * heads * head_dim forward, x3 with backward: the full, not causally halved, s^2): FLOP/s
  memory     a large tensor copy (read + write): GB/s
  ops        the fixed cost of one operation (op_overhead_us): one megaclm TransformerLayer (the Llama family:
             RMSNorm, RoPE, GQA, SwiGLU; the reference ops on a CPU) at a size where its arithmetic is nothing
             (hidden 64, 16 tokens), forward and backward, over the 3 x megaclm.planner.cost.OPS_PER_LAYER
             operations the cost model counts per layer: Python, dispatcher and autograd per op on a CPU,
             kernel launches on a GPU
  links      all-reduce and all-gather between 2 processes (forkserver) over gloo on the CPU, nccl on 2 GPUs:
             bus bandwidth of a large message (all-reduce: 2(n-1)/n x size / time, the profile's gbps; all-gather:
             (n-1)/n x output / time, its gather_gbps) and the latency of a call as training sees it: what a 4-byte
             all-reduce adds between matmuls (the ranks meet at every call; on a busy host that includes waiting
             to be scheduled), at least what one of 20 back-to-back calls takes. Both links of the profile (inside / across nodes) get what
             was measured, unless there are fewer than 2 GPUs: then they stay the --base profile's.
Each rate is the median of --iters timed runs after warm-up (the load average is recorded beside it: on a shared
host the others' work shows in every figure). The peak is --peak-tflops (the datasheet's) when given, else the
measured matmul rate; the achievable fractions are then measured rate / peak. Everything else (HBM size, PCIe,
CPU Adam) comes from --base when given, else from the machine (memory size, the copy bandwidth). Writes the JSON
atomically; prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.planner.hardware import load_profile, profile_from_dict  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402
from megaclm.utils.fileio import atomic_write  # noqa: E402


def timed(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """The median of `iters` runs of fn() after `warmup`, in seconds: the step times the planner is checked
    against are medians too (the fastest run would pick the moments the others' work left the host alone)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(device, dtype, tokens: int, hidden: int, iters: int) -> float:
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(hidden, 4 * hidden, device=device, dtype=dtype, requires_grad=True)

    def step():
        (x @ w).sum().backward()

    return 6 * tokens * hidden * 4 * hidden / timed(step, device, iters)


def attention_flops(device, dtype, seq: int, heads: int, head_dim: int, iters: int) -> float:
    q, k, v = (torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return 3 * 4 * seq * seq * heads * head_dim / timed(step, device, iters)


def copy_gbps(device, nbytes: int, iters: int) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, iters) / 1e9


def op_overhead_us(device, iters: int) -> float:
    """Microseconds per operation of a megaclm TransformerLayer too small for its arithmetic to count."""
    from megaclm.config.kernels import KernelsConfig
    from megaclm.config.presets import model_preset
    from megaclm.model.gpt import TransformerLayer
    from megaclm.ops import build_ops
    from megaclm.parallel.state import ParallelState
    from megaclm.planner.cost import OPS_PER_LAYER

    config = model_preset("llama-7b", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, max_position_embeddings=16)
    kernels = KernelsConfig(op_backend="fused" if device.type == "cuda" else "torch")
    layer = TransformerLayer(config, ParallelState.single(), build_ops(kernels), kernels).to(device)
    x = torch.randn(1, 16, 64, device=device, requires_grad=True)
    positions = torch.arange(16, device=device)[None]

    def step():
        layer(x, positions)[0].sum().backward()

    reps = 20  # layers per timed run: a run of ~1 ms of overhead, long beside the timer's resolution
    return timed(lambda: [step() for _ in range(reps)], device, iters) / reps / (3 * OPS_PER_LAYER) * 1e6


def _link_worker(rank: int, port: int, backend: str, nbytes: int, iters: int, threads: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's note on all_gather_into_tensor's name
    dist.init_process_group(backend, rank=rank, world_size=2)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    big = torch.ones(nbytes // 4, device=device)
    gathered = torch.empty(2 * big.numel(), device=device)
    tiny = torch.ones(1, device=device)
    # A call's latency as training sees it: what one small all-reduce adds to a stream of ~1 ms matmuls (each
    # rank waits for the other to arrive; on a busy host that includes being scheduled).
    a = torch.randn(256 if device.type == "cpu" else 4096, 256 if device.type == "cpu" else 4096, device=device)

    def compute():
        for _ in range(20):
            a @ a

    def compute_and_call():
        for _ in range(20):
            a @ a
            dist.all_reduce(tiny)

    def calls():
        for _ in range(20):
            dist.all_reduce(tiny)

    bare = timed(compute, device, iters)
    # Back-to-back calls are the floor (medians of a noisy host can make the difference below it).
    alone = timed(calls, device, iters)
    result = {"all_reduce_s": timed(lambda: dist.all_reduce(big), device, iters),
              "all_gather_s": timed(lambda: dist.all_gather_into_tensor(gathered, big), device, iters),
              "latency_s": max(timed(compute_and_call, device, iters) - bare, alone) / 20}
    dist.destroy_process_group()
    if rank == 0:
        out.put(result)


def link(backend: str, nbytes: int, iters: int, threads: int) -> dict:
    """Bus bandwidth (GB/s) and per-call latency (us) between 2 processes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    procs = [ctx.Process(target=_link_worker, args=(r, port, backend, nbytes, iters, threads, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join()
    n = 2
    ar = 2 * (n - 1) / n * nbytes / result["all_reduce_s"] / 1e9
    ag = (n - 1) / n * n * nbytes / result["all_gather_s"] / 1e9
    # gloo's all-gather is far slower than its all-reduce on the CPU: the profile keeps both (gbps, gather_gbps).
    return {"gbps": round(ar, 3), "gather_gbps": round(ag, 3), "latency_us": round(result["latency_s"] * 1e6, 2),
            "all_reduce_busbw_gbps": round(ar, 3), "all_gather_busbw_gbps": round(ag, 3)}


def measure(args) -> dict:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gpu = device.type == "cuda"
    torch.set_num_threads(args.threads)
    dtype, name = (torch.bfloat16, "bf16") if gpu else (torch.float32, "fp32")
    h, tokens, seq = (8192, 8192, 4096) if gpu else (args.hidden, args.tokens, args.seq)
    mm = matmul_flops(device, dtype, tokens, h, args.iters)
    attn = attention_flops(device, dtype, seq, 8 if not gpu else 32, 64 if not gpu else 128, args.iters)
    mem = copy_gbps(device, (1 << 30) if gpu else args.copy_mib << 20, args.iters)
    overhead = op_overhead_us(device, args.iters)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else mm
    base = load_profile(args.base).to_dict() if args.base else None
    links = None
    if not gpu or torch.cuda.device_count() >= 2:
        measured = link("nccl" if gpu else "gloo", (256 << 20) if gpu else args.link_mib << 20, args.iters,
                        args.threads)
        links = {"intra_node": measured, "inter_node": dict(measured)}
    elif base is None:
        raise UserError("one GPU: the links cannot be measured; pass --base PROFILE (e.g. h100-80gb) to take them "
                        "from a shipped profile")
    hbm = torch.cuda.get_device_properties(0).total_memory if gpu else os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES")
    profile = {
        "name": args.name or (torch.cuda.get_device_name(0) if gpu else "cpu"),
        "description": f"measured by bench/profile_hardware.py on {'cuda' if gpu else 'cpu'} "
                       f"({torch.get_num_threads()} threads), torch {torch.__version__}",
        "hbm_gib": round(hbm / 2 ** 30, 2),
        "peak_tflops": {name: round(peak / 1e12, 6)},
        "achievable": {"matmul": round(min(1.0, mm / peak), 4), "attention": round(min(1.0, attn / peak), 4),
                       "memory": 1.0},
        "hbm_gbps": round(mem, 3),
        "pcie_gbps": base["pcie_gbps"] if base else round(mem, 3),
        "cpu_adam_gparams_per_s": base["cpu_adam_gparams_per_s"] if base else 0.25,
        "op_overhead_us": round(overhead, 2),
        "links": links or base["links"],
        "measured": {"matmul_tflops": mm / 1e12, "attention_tflops": attn / 1e12, "copy_gbps": mem,
                     "op_overhead_us": overhead, "load_average": os.getloadavg(),
                     "shapes": {"matmul": [tokens, h, 4 * h], "attention_seq": seq}},
    }
    if gpu and base:  # the datasheet's other dtypes, scaled like the measured one
        profile["peak_tflops"] = {**base["peak_tflops"], name: round(peak / 1e12, 6)}
    profile_from_dict(profile, "measured profile")  # what plan_layout.py will accept
    return profile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Profile JSON to write.")
    parser.add_argument("--name", default=None, help="The profile's name (default: the device's).")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="The datasheet's dense peak for the measured dtype; default: the measured matmul rate.")
    parser.add_argument("--base", default=None, help="A shipped profile for what is not measured (GPU: its links "
                                                      "with one GPU, PCIe, CPU Adam).")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process (default 1: as each of 2 ranks on 2 cores runs).")
    parser.add_argument("--iters", type=int, default=7, help="Timed repetitions (their median counts).")
    parser.add_argument("--hidden", type=int, default=256, help="CPU: GEMM hidden size.")
    parser.add_argument("--tokens", type=int, default=512, help="CPU: GEMM rows (tokens).")
    parser.add_argument("--seq", type=int, default=512, help="CPU: attention sequence length.")
    parser.add_argument("--copy-mib", type=int, default=256, help="CPU: copy size.")
    parser.add_argument("--link-mib", type=int, default=16, help="CPU: all-reduce/all-gather message size.")
    args = parser.parse_args(argv)
    for name in ("threads", "iters", "hidden", "tokens", "seq", "copy_mib", "link_mib"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak-tflops {args.peak_tflops} must be > 0")
    profile = measure(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_write(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(json.dumps(profile, indent=1))
    return 0


if __name__ == "__main__":
    cli_main(main)
