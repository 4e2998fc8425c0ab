"""Long-context benchmark: tokens/s and activation memory per rank against sequence length, for the unsplit
model (N=1) and the sequence split over N=2 ranks (DeepSpeed-Ulysses, ring attention), in one run.

    python bench/long_context.py                      # T = 1024, 2048, 4096 on CPU (gloo ranks)
    python bench/long_context.py --seq-lengths 8192 32768 --layers 4 --hidden 1024   # the same on GPUs (nccl)
    python bench/long_context.py --quick              # T = 256, 512: a smoke run

Each case spawns N processes (world = N, one sample of T tokens shared by them, forward + backward of a
Llama-shaped GPTModel with GQA; steps after a warm-up are timed). Reported per rank:
  tokens/s      T / step time (the whole sample's tokens, all ranks together)
  act MiB       bytes autograd saved for backward during the forward (distinct storages, weights excluded):
                the activation memory that 1/N is about; on CUDA also the peak allocated memory
Ratios: Ulysses against N=1 with the same SDPA core attention; ring attention, which computes its blocks
with explicit scores (megaclm.parallel.context), against N=1 with the unfused (explicit-scores) attention.
"""
import argparse
import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.config.kernels import KernelsConfig  # noqa: E402
from megaclm.config.model import ModelConfig  # noqa: E402
from megaclm.model.gpt import GPTModel  # noqa: E402
from megaclm.parallel.context import shard_sequence  # noqa: E402
from megaclm.parallel.random import model_parallel_seed  # noqa: E402
from megaclm.parallel.state import ParallelState  # noqa: E402

VOCAB = 1024
CASES = [("N=1 sdpa", 1, None, "sdpa"), ("N=1 unfused", 1, None, "unfused"),
         ("ulysses N=2", 2, "ulysses", "sdpa"), ("ring N=2", 2, "ring", "sdpa")]


def saved_bytes(fn, params):
    """Run fn(); bytes of the distinct non-parameter storages autograd saved for backward meanwhile (the
    activations), and fn's result."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def worker(rank, world, port, args, kind, backend, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    import deepspeed  # DistributedAttention talks through deepspeed.comm

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    sizes = {} if kind is None else ({"ulysses_size": world} if kind == "ulysses" else {"context_parallel_size": world})
    pstate = ParallelState(world, rank, **sizes)
    pstate.init_process_groups()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for T in args.seq_lengths:
        config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             num_query_groups=args.heads // 2, ffn_hidden_size=2 * args.hidden,
                             max_position_embeddings=T, position_embedding_type="rope", normalization="RMSNorm",
                             swiglu=True, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
        model_parallel_seed(1, 0, 0, pstate.cp_rank)
        torch.manual_seed(1)
        model = GPTModel(config, VOCAB, pstate, KernelsConfig(attention_backend=backend)).to(device, dtype)
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, VOCAB, (1, T), generator=g)
        pos = torch.arange(T).expand(1, T)
        local = [shard_sequence(x, pstate.cp_size, pstate.cp_rank, kind == "ring").to(device) for x in (ids, pos)]
        act, times = 0, []
        for step in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            dist.barrier()
            start = time.perf_counter()
            act, loss = saved_bytes(lambda: model(local[0], local[1], labels=local[0]).float().mean(),
                                    model.parameters())
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        step_time = torch.tensor(sum(times) / len(times))
        dist.all_reduce(step_time, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        rows.append({"T": T, "tokens_per_s": T / step_time.item(), "act": act, "peak": peak})
    if rank == 0:
        out_q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def run_case(world, kind, backend, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, kind, backend, q)) for r in range(world)]
    for p in procs:
        p.start()
    rows = q.get(timeout=3600)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{kind or 'unsplit'} rank exited with {p.exitcode}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    ap.add_argument("--quick", action="store_true", help="T = 256, 512, one timed step")
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_lengths, args.steps, args.warmup = [256, 512], 1, 1
    results = {name: run_case(n, kind, backend, args) for name, n, kind, backend in CASES}
    base = {"ulysses N=2": "N=1 sdpa", "ring N=2": "N=1 unfused"}
    print(f"Llama {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.heads // 2}, batch 1, "
          f"{'CUDA bf16' if torch.cuda.is_available() else 'CPU fp32, gloo'}")
    print(f"{'case':<12}{'T':>7}{'tokens/s':>11}{'act MiB':>10}{'peak MiB':>10}{'speed x':>9}{'act x':>8}")
    for name, *_ in CASES:
        for i, row in enumerate(results[name]):
            ref = results[base[name]][i] if name in base else None
            speed = f"{row['tokens_per_s'] / ref['tokens_per_s']:9.2f}" if ref else f"{'':9s}"
            mem = f"{row['act'] / ref['act']:8.3f}" if ref else f"{'':8s}"
            peak = f"{row['peak'] / 2**20:10.1f}" if row["peak"] is not None else f"{'-':>10s}"
            print(f"{name:<12}{row['T']:>7}{row['tokens_per_s']:>11.0f}{row['act'] / 2**20:>10.1f}{peak}{speed}{mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    main()
