#!/usr/bin/env python
"""Expert parallelism: what one rank holds and how fast it steps, EP=1 against EP=2, on 2 ranks in one run.

    python bench/moe.py              # 8 experts (top-2) of 1024 in 4 layers of hidden 256, ZeRO-1, fp32, CPU
    python bench/moe.py --quick      # tiny shapes: checks the script in seconds
    python bench/moe.py --json       # also one JSON line

Each case is megaclm's own path: pretrain_gpt.py's flags parsed (--mock-data), init_distributed, build_model
and build_engine (DeepSpeed's MoE parameter groups; ZeRO-1 partitions the experts' states over the ranks
holding them), then forward + backward + step on fixed random batches, warm-up steps excluded. Per rank:
  weights MiB     the parameters the rank holds (the routed experts: 1/EP of them)
  optimizer MiB   ZeRO-1's fp32 partition and the Adam moments on the rank
  estimate MiB    megaclm.model.flops.estimate_memory's weights + fp32 master + Adam moments for the setup
  tokens/s        global-batch tokens / median step time (CPU: the experts' FLOPs per rank are the same at
                  EP=1 and EP=2 with balanced routing; EP=2 adds two all-to-alls per MoE layer)
and the ratios EP=2 / EP=1.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2 ** 20


def _argv(args, ep: int) -> list[str]:
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads", "4",
            "--seq-length", str(args.seq), "--max-position-embeddings", str(args.seq), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "10", "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "1024", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
            "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0", "--zero-stage", "1",
            "--num-experts", str(args.experts), "--moe-router-topk", "2", "--moe-ffn-hidden-size", str(args.ffn),
            "--expert-model-parallel-size", str(ep)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(rank: int, args, ep: int) -> dict:
    from megaclm.config import compute_derived, parse_args
    from megaclm.config.deepspeed_json import deepspeed_config
    from megaclm.model.flops import MemorySetup, estimate_memory
    from megaclm.training.engine import build_engine, build_model, init_distributed

    cfg, _, _ = parse_args(_argv(args, ep), world_size=2)
    derived = compute_derived(cfg, 2, vocab_size=1024)
    ds_config = deepspeed_config(cfg, derived, cuda=False)
    pstate = init_distributed(cfg)
    engine = build_engine(cfg, build_model(cfg, derived.padded_vocab_size, pstate, ds_config), pstate, ds_config)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 1000, (2, args.seq), generator=g)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        for _ in range(derived.grad_accum_steps):
            engine.backward(engine(ids, labels=ids).mean())
            engine.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    opt = engine.optimizer
    states = [t for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    setup = MemorySetup(seq_length=args.seq, micro_batch_size=2, data_parallel=2, zero_stage=1, precision="fp32",
                        expert_parallel=ep)
    est = estimate_memory(cfg.model, derived.padded_vocab_size, setup).gpu
    return {"ep": ep, "weights": _bytes(engine.module.parameters()) / MiB,
            "optimizer": (_bytes(opt.single_partition_of_fp32_groups) + _bytes(states)) / MiB,
            "estimate": (est["weights"] + est["fp32 master weights"] + est["Adam moments"]) / MiB,
            "tokens_per_s": 4 * args.seq / statistics.median(times)}


def worker(rank: int, port: int, args, ep: int, out) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    try:
        out.put((rank, measure(rank, args, ep)))
    except BaseException:  # to the parent, which would otherwise wait for it
        out.put((rank, traceback.format_exc()))


def run_case(args, ep: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, args, ep, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=args.timeout) for _ in procs)
    for p in procs:
        p.join()
    for rank, result in results.items():
        if isinstance(result, str):
            raise RuntimeError(f"EP={ep}, rank {rank} failed:\n{result}")
    return [results[r] for r in range(2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1024, help="Inner size of each expert.")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="Torch threads per rank.")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--quick", action="store_true", help="Tiny shapes, 2 steps.")
    p.add_argument("--json", action="store_true", help="Also print one JSON line with every number.")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.experts, args.ffn, args.seq, args.steps, args.warmup = 2, 64, 4, 128, 32, 2, 1
    cases = {ep: run_case(args, ep) for ep in (1, 2)}
    print(f"{'':6s}{'weights MiB':>13s}{'optimizer MiB':>15s}{'estimate MiB':>14s}{'tokens/s':>11s}"
          "   (rank 0 of 2)")
    for ep, ranks in cases.items():
        r = ranks[0]
        print(f"EP={ep:<3d}{r['weights']:13.2f}{r['optimizer']:15.2f}{r['estimate']:14.2f}{r['tokens_per_s']:11.1f}")
    one, two = cases[1][0], cases[2][0]
    ratios = {k: two[k] / one[k] for k in ("weights", "optimizer", "estimate", "tokens_per_s")}
    print("EP=2 / EP=1: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.json:
        print(json.dumps({"cases": {str(ep): ranks for ep, ranks in cases.items()}, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
