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
  zero-3     what ZeRO-3 adds to that layer's forward and backward (zero3_layer_us): DeepSpeed's module hooks
             and parameter bookkeeping, 8 such layers under a 1-rank ZeRO-3 engine against ZeRO-0, per layer
  links      all-reduce and all-gather between 2 processes (forkserver) over gloo on the CPU, nccl on 2 GPUs,
             as training sees a call: what k calls add to a stream of matmuls (the ranks meet at every call; on a
             busy host that includes waiting to be scheduled), at least what k back-to-back calls take. Per
             message size from 4 KiB to --link-mib in x4 steps: the link's `sizes` curves (seconds per call by
             wire bytes, made non-decreasing), which the planner reads instead of bandwidth + latency; the
             largest message gives the bus bandwidth (gbps, gather_gbps), a 4-byte all-reduce the latency.
             Both links of the profile (inside / across nodes) get what was measured, unless there are fewer
             than 2 GPUs: then they stay the --base profile's.
  overlap    the largest all-reduce issued asynchronously over as much matmul work as it takes alone: the
             fraction of it hidden, (compute + comm - both) / min(compute, comm), clipped to [0, 1]
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
import queue
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
    from megaclm.planner.cost import OPS_PER_LAYER

    layer = _tiny_layers(device, 1)
    x = torch.randn(1, 16, 64, device=device, requires_grad=True)
    positions = torch.arange(16, device=device)[None]

    def step():
        layer(x, positions).sum().backward()

    reps = 20  # layers per timed run: a run of ~1 ms of overhead, long beside the timer's resolution
    return timed(lambda: [step() for _ in range(reps)], device, iters) / reps / (3 * OPS_PER_LAYER) * 1e6


def _between_matmuls(device, iters: int):
    """(timer, a): timer(fn, k) is the seconds k calls of fn() add to a stream of ~0.5 ms matmuls (a
    collective as training sees it: the ranks meet at every call; on a busy host that includes waiting to be
    scheduled), at least what k back-to-back calls take (the floor: medians of a noisy host can come out below);
    a is the matmul's operand."""
    n = 256 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device)

    def timer(fn, k: int) -> float:
        bare = timed(lambda: [a @ a for _ in range(k)], device, iters)
        mixed = timed(lambda: [(a @ a, fn()) for _ in range(k)], device, iters)
        return max(mixed - bare, timed(lambda: [fn() for _ in range(k)], device, iters)) / k

    return timer, a


def _link_worker(rank: int, port: int, backend: str, nbytes: int, iters: int, threads: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's note on all_gather_into_tensor's name
    dist.init_process_group(backend, rank=rank, world_size=2)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    per_call, a = _between_matmuls(device, iters)
    curves = {"all_reduce": [], "gather": []}
    size = 4096
    while size <= nbytes:  # x4 steps from 4 KiB; for 2 ranks a call's wire bytes are its message's
        x = torch.ones(size // 4, device=device)
        gathered = torch.empty(2 * x.numel(), device=device)
        k = max(1, min(20, (4 << 20) // size))
        curves["all_reduce"].append([size, per_call(lambda: dist.all_reduce(x), k)])
        curves["gather"].append([size, per_call(lambda: dist.all_gather_into_tensor(gathered, x), k)])
        size *= 4
    tiny = torch.ones(1, device=device)
    latency = per_call(lambda: dist.all_reduce(tiny), 20)
    # Overlap: the largest all-reduce issued asynchronously over as much compute as it takes alone.
    comm = curves["all_reduce"][-1][1]
    reps = max(1, round(comm / timed(lambda: a @ a, device, iters)))

    def both():
        work = dist.all_reduce(x, async_op=True)
        for _ in range(reps):
            a @ a
        work.wait()

    compute = timed(lambda: [a @ a for _ in range(reps)], device, iters)
    overlap = (compute + comm - timed(both, device, iters)) / min(compute, comm)
    dist.destroy_process_group()
    if rank == 0:
        out.put({"curves": curves, "latency_s": latency, "overlap": min(1.0, max(0.0, overlap))})


def link(backend: str, nbytes: int, iters: int, threads: int) -> tuple[dict, float]:
    """A link between 2 processes (bus bandwidth in GB/s and per-call latency in us of the large and the empty
    message, and the measured curves by size) and the fraction of a collective that runs under compute."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    procs = [ctx.Process(target=_link_worker, args=(r, port, backend, nbytes, iters, threads, out)) for r in range(2)]
    for p in procs:
        p.start()
    result = _wait_for(out, procs, "measuring the links")
    curves = {}
    for kind, points in result["curves"].items():  # a larger message is never cheaper: noise made monotone
        floor, curves[kind] = 0.0, []
        for size, secs in points:
            floor = max(floor, secs)
            curves[kind].append([size, floor])
    # gloo's all-gather is far slower than its all-reduce on the CPU: the profile keeps both (gbps, gather_gbps).
    (ar_bytes, ar_s), (ag_bytes, ag_s) = curves["all_reduce"][-1], curves["gather"][-1]
    return {"gbps": round(ar_bytes / ar_s / 1e9, 3), "gather_gbps": round(ag_bytes / ag_s / 1e9, 3),
            "latency_us": round(result["latency_s"] * 1e6, 2), "sizes": curves}, round(result["overlap"], 3)


def zero3_layer_us(device, iters: int) -> float:
    """Microseconds ZeRO-3 adds to one megaclm TransformerLayer's forward and backward (DeepSpeed's module hooks,
    its parameter bookkeeping, gathers within 1 rank), at a size where the arithmetic is nothing. In its own
    process: DeepSpeed needs a process group."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    proc = ctx.Process(target=_zero3_worker, args=(device.type, iters, torch.get_num_threads(), out))
    proc.start()
    result = _wait_for(out, [proc], "measuring ZeRO-3's per-layer cost")
    if isinstance(result, str):
        raise RuntimeError(f"measuring ZeRO-3's per-layer cost failed:\n{result}")
    return result


def _wait_for(out, procs: list, what: str, timeout: float = 600.0):
    """The one result the worker processes put on `out`, then joins them. A worker that dies without reporting (a
    crash in C++, or its peer waiting forever in a collective) or a run past `timeout` seconds is a RuntimeError
    naming `what`, with every worker stopped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = out.get(timeout=1)
            break
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive() and p.exitcode != 0]
            if dead or time.monotonic() > deadline or all(not p.is_alive() for p in procs) and out.empty():
                for p in procs:
                    p.kill()
                why = f"a worker exited with code {dead[0].exitcode}" if dead else "no worker reported"
                raise RuntimeError(f"{what} failed: {why} (after {timeout - deadline + time.monotonic():.0f} s)")
    for p in procs:
        p.join()
    return result


def _zero3_worker(device_type: str, iters: int, threads: int, out) -> None:
    import logging
    import traceback

    try:
        import deepspeed

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(threads)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed("nccl" if device_type == "cuda" else "gloo")
        device = torch.device(device_type)
        layers = 8
        x, positions = torch.randn(1, 16, 64, device=device), torch.arange(16, device=device)[None]
        seconds = {}
        for stage in (0, 3):
            stack = _tiny_layers(device, layers)
            config = {"train_micro_batch_size_per_gpu": 1,
                      "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
            engine, *_ = deepspeed.initialize(model=stack, model_parameters=stack.parameters(), config=config)

            def step():
                engine.backward(engine(x, positions).sum())

            seconds[stage] = timed(step, device, iters)
            engine.destroy()
        out.put(max(0.0, seconds[3] - seconds[0]) / layers * 1e6)
    except Exception:  # noqa: BLE001 - reported to the parent with its traceback
        out.put(traceback.format_exc())


def _tiny_layers(device, layers: int) -> torch.nn.Module:
    """`layers` megaclm TransformerLayers (the Llama family) of hidden 64: all overhead, no arithmetic."""
    from megaclm.config.kernels import KernelsConfig
    from megaclm.config.presets import model_preset
    from megaclm.model.gpt import TransformerLayer
    from megaclm.ops import build_ops
    from megaclm.parallel.state import ParallelState

    config = model_preset("llama-7b", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, max_position_embeddings=16)
    kernels = KernelsConfig(op_backend="fused" if device.type == "cuda" else "torch")

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(TransformerLayer(config, ParallelState.single(), build_ops(kernels),
                                                               kernels) for _ in range(layers))

        def forward(self, x, positions):
            for layer in self.layers:
                x = layer(x, positions)[0]
            return x

    return Stack().to(device)


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
    try:
        zero3, zero3_error = zero3_layer_us(device, args.iters), None
    except RuntimeError as e:  # keep the rest of the profile (a GPU session's time is scarce); say what failed
        zero3, zero3_error = 0.0, str(e).strip().splitlines()[-1]
        print(f"warning: ZeRO-3's per-layer cost not measured, the profile counts none ({zero3_error})",
              file=sys.stderr)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else mm
    base = load_profile(args.base).to_dict() if args.base else None
    links, overlap = None, (base or {}).get("overlap", 1.0)
    if not gpu or torch.cuda.device_count() >= 2:
        measured, overlap = link("nccl" if gpu else "gloo", (256 << 20) if gpu else args.link_mib << 20, args.iters,
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
        "overlap": overlap,
        "zero3_layer_us": round(zero3, 1),
        "links": links or base["links"],
        "measured": {"matmul_tflops": mm / 1e12, "attention_tflops": attn / 1e12, "copy_gbps": mem,
                     "op_overhead_us": overhead, "zero3_layer_us": zero3, "zero3_error": zero3_error,
                     "load_average": os.getloadavg(),
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
