#!/usr/bin/env python
"""GPU efficiency measured on the CPU: activation bytes, collectives, FLOPs and host syncs of one optimizer
step, for each parallel layout, against their analytic minimum.

    python bench/efficiency.py            # Llama shape: 4 layers, hidden 256, GQA 8/4 heads, SwiGLU, seq 512, fp32
    python bench/efficiency.py --quick    # 2 layers, hidden 64, seq 64: the CI audit (asserts the budgets below)
    python bench/efficiency.py --json F   # also every number as JSON in F

Every layout runs on the same 2 gloo ranks, spawned once, through megaclm's own path: pretrain_gpt.py's
flags parsed (--mock-data), init_distributed, build_model, build_engine (DeepSpeed), and the trainer's
`train_step` (megaclm.training.loop) on the mock data: 2 micro-batches per optimizer step. One warm-up
step, then one measured step. The baseline "tp1" is plain data parallelism (ZeRO-0) on the 2 ranks: each
rank keeps the activations of one GPU of a TP=1 run.

What is measured, per rank (rank 0 is shown; the FLOPs are summed over the ranks):
  act     bytes autograd keeps for backward per transformer layer and micro-batch: saved-tensor hooks
          during the forward, distinct storages, parameters excluded, what the embedding and the
          final norm / loss save excluded; shown as the ratio to tp1's.
  coll    collectives of one optimizer step (torch.distributed calls; megaclm's reduce-scatter counts as one
          reduce-scatter also where gloo runs it as an all-reduce), by kind and process group: calls and
          bytes (all-reduce: the tensor; all-gather: the gathered output; reduce-scatter: the input;
          send/recv, broadcast, all-to-all: the tensor sent).
  flops   torch.utils.flop_counter's FLOPs of the step, summed over the ranks, over megaclm's model FLOPs
          (megaclm.model.flops.flops_per_token x the step's tokens), the MFU numerator.
  syncs   host synchronisations in the step: calls of Tensor.item/.tolist/.cpu/.nonzero/__bool__/__float__/
          __int__ and torch.nonzero, each attributed to the source line that made it.

Ideal values (b micro-batch, s sequence, h hidden, L layers, m micro-batches per step, P parameters on the
rank, e bytes per element, t = 2 ranks):
  activations (ratio to tp1), from megaclm.model.flops.layer_activation_bytes (Korthikanti et al. 2022):
    tp2         the norm/QKV/MLP inputs stay whole, the rest is split: (whole + split/t) / (whole + split)
    tp2-sp      1/t                          tp2-sp-sel   1/t of tp1 without the core-attention saves
    recompute   the layer input only: s*b*h*e / tp1     ulysses, ring   1/t (ring: + the gathered K/V)
    pp2, zero1/2/3, lora, ep2-moe    1 (ep2: the MoE layer's own; each rank runs k experts per token)
  collectives per optimizer step:
    tp1, recompute, lora    DP all-reduce of the gradients (of the trainable P), in buckets
    tp2      per layer and micro-batch: 2 all-reduces of (b, s, h) forward, 2 backward; + the embedding's
             forward all-reduce and the input's backward one; then the DP-replicated gradients: none (dp 1)
    tp2-sp   per layer and micro-batch: 2 all-gathers + 2 reduce-scatters of (b, s, h) forward, the same
             backward (the SP-replicated gradients: one coalesced all-reduce per step)
    ulysses  per layer and micro-batch: 4 all-to-alls forward (q, k, v, out), 4 backward; + DP all-reduce
    ring     per layer and micro-batch: 1 all-gather of K and V forward, 1 reduce-scatter backward
    zero1/2  one reduce-scatter of the gradients (P*e) and one all-gather of the parameters (P*e) per step
    zero3    + the parameter all-gathers forward and backward (2 x P*e per micro-batch)
    pp2      per micro-batch one send/recv of (b, s, h) each way at the boundary (+ the tied embedding's
             all-reduce, DeepSpeed's loss broadcast)
    ep2-moe  per MoE layer and micro-batch 2 all-to-alls forward, 2 backward; + DP all-reduce
  flops     1.0; selective recompute 1 + the core attention's forward; full recompute 1 + the layers'
            forward (8/6 of the layers' share)
  syncs     what logging needs: the step's loss, once

Budgets (asserted with --quick, the CI audit): act <= 1.05 x ideal; collective bytes <= 1.1 x analytic;
calls <= analytic + COLL_SLACK; FLOPs within 2% of expected; syncs <= SYNC_BUDGET per step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import traceback
from collections import Counter, defaultdict

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 1024
MICRO = 2  # micro-batches per optimizer step
ACT_BUDGET, BYTES_BUDGET, FLOPS_TOLERANCE = 1.05, 1.1, 0.02
COLL_SLACK = 4  # calls DeepSpeed adds per step besides the analytic ones (e.g. its overflow / norm checks)
SYNC_BUDGET = 6  # host syncs per step (see the README's performance section for where they come from)

# name -> flags on top of the shape's (every layout runs on 2 ranks)
LAYOUTS = {
    "tp1": ["--zero-stage", "0"],
    "tp2": ["--tensor-model-parallel-size", "2", "--zero-stage", "0"],
    "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--zero-stage", "0"],
    "tp2-sp-sel": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--zero-stage", "0",
                   "--recompute-granularity", "selective"],
    "recompute": ["--zero-stage", "0", "--recompute-granularity", "full", "--recompute-method", "uniform",
                  "--recompute-num-layers", "1"],
    "ulysses2": ["--ds-sequence-parallel-size", "2", "--zero-stage", "0"],
    "ring2": ["--context-parallel-size", "2", "--zero-stage", "0"],
    "pp2": ["--pipeline-model-parallel-size", "2", "--zero-stage", "0"],
    "zero1": ["--zero-stage", "1"],
    "zero2": ["--zero-stage", "2"],
    "zero3": ["--zero-stage", "3", "--zero-param-persistence-threshold", "0"],
    "ep2-moe": ["--zero-stage", "1", "--num-experts", "4", "--moe-router-topk", "2", "--expert-model-parallel-size", "2"],
    "lora": ["--zero-stage", "0", "--lora-rank", "8"],
}


def shape_argv(args) -> list[str]:
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads", "8",
            "--num-query-groups", "4", "--group-query-attention", "--ffn-hidden-size", str(args.ffn),
            "--seq-length", str(args.seq), "--max-position-embeddings", str(args.seq),
            "--micro-batch-size", "1", "--train-iters", "10", "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB - 1), "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type",
            "rope", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--untie-embeddings-and-output-weights", "--seed", "1234", "--lr", "1e-4", "--log-interval", "1000",
            "--num-workers", "0"]


# ---------------------------------------------------------------------------------------------
# Instruments


class SavedActivations:
    """Bytes autograd keeps during the model's forward (not a recompute in backward), per forward call, split
    into the transformer layers' share and the rest (embedding, final norm and loss)."""

    def __init__(self, module: torch.nn.Module, embedding: torch.nn.Module | None, head: torch.nn.Module | None):
        self.weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.seen: set[int] = set()
        self.calls: list[Counter] = []
        self.phase = None  # None outside the forward
        self.handles = [module.register_forward_pre_hook(lambda *a: self._set("layers", new_call=True)),
                        module.register_forward_hook(lambda *a: self._set(None))]
        if embedding is not None:
            self.handles += [embedding.register_forward_pre_hook(lambda *a: self._set("other")),
                             embedding.register_forward_hook(lambda *a: self._set("layers"))]
        if head is not None:
            self.handles.append(head.register_forward_pre_hook(lambda *a: self._set("other")))

    def _set(self, phase, new_call=False):
        if new_call:
            self.calls.append(Counter())
        self.phase = phase

    def pack(self, t: torch.Tensor):
        if self.phase is not None:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self.weights and key not in self.seen and s.nbytes() > 0:
                self.seen.add(key)
                self.calls[-1][self.phase] += s.nbytes()
        return t

    def close(self):
        for h in self.handles:
            h.remove()

    @contextlib.contextmanager
    def installed(self):
        """Saved-tensor hooks, plus DeepSpeed's activation checkpoint, which keeps its inputs on its ctx
        without save_for_backward (deepspeed.checkpointing.CheckpointFunction)."""
        import deepspeed

        checkpoint = deepspeed.checkpointing.checkpoint

        def kept(function, *args):
            for a in args:
                if torch.is_tensor(a):
                    self.pack(a)
            return checkpoint(function, *args)

        deepspeed.checkpointing.checkpoint = kept
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield self
        finally:
            deepspeed.checkpointing.checkpoint = checkpoint


COLLECTIVES = {  # torch.distributed function -> (kind, the positional argument whose bytes count)
    "all_reduce": ("all-reduce", 0), "all_gather": ("all-gather", 0),
    "all_gather_into_tensor": ("all-gather", 0), "_all_gather_base": ("all-gather", 0),
    "reduce_scatter": ("reduce-scatter", 1), "reduce_scatter_tensor": ("reduce-scatter", 1),
    "_reduce_scatter_base": ("reduce-scatter", 1), "broadcast": ("broadcast", 0),
    "send": ("send", 0), "recv": ("recv", 0), "isend": ("send", 0), "irecv": ("recv", 0),
    "all_to_all_single": ("all-to-all", 1), "all_to_all": ("all-to-all", 1), "reduce": ("reduce", 0),
    "barrier": ("barrier", None), "all_gather_object": ("all-gather-object", None),
}


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveCounter:
    """Counts torch.distributed collectives by (kind, group name): calls and bytes. Calls made inside a
    counted one (megaclm's gloo reduce-scatter, which is an all-reduce) are not counted again, nor calls on
    a group of one rank (no traffic)."""

    def __init__(self, group_names: dict):
        self.group_names = group_names
        self.calls, self.bytes = Counter(), Counter()
        self.depth = 0
        self.active = False

    def _group(self, group) -> str:
        import torch.distributed as dist

        if group is None or group is dist.group.WORLD:
            return "world"
        for name, g in self.group_names.items():
            if g is group:
                return name
        return "ranks" + ",".join(map(str, dist.get_process_group_ranks(group)))

    def wrap(self, fn, kind: str, arg: int | None):
        import torch.distributed as dist

        def counted(*a, **kw):
            if self.active and self.depth == 0:
                group = kw.get("group", next((x for x in a if isinstance(x, dist.ProcessGroup)), None))
                if dist.get_world_size(group) > 1:
                    key = (kind, self._group(group))
                    self.calls[key] += 1
                    if arg is not None:  # by position, else the first tensor (list) passed by keyword
                        x = a[arg] if len(a) > arg else next(
                            (v for v in kw.values() if torch.is_tensor(v) or isinstance(v, list)), None)
                        self.bytes[key] += _nbytes(x)
            self.depth += 1
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1

        return counted

    @contextlib.contextmanager
    def installed(self):
        import torch.distributed as dist

        from megaclm.parallel import mappings

        saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, fn in saved.items():
            setattr(dist, name, self.wrap(fn, *COLLECTIVES[name]))
        # gloo has no reduce-scatter: megaclm runs it as an all-reduce (named _reduce_scatter before issue 24)
        name = "reduce_scatter" if hasattr(mappings, "reduce_scatter") else "_reduce_scatter"
        reduce_scatter = getattr(mappings, name)
        setattr(mappings, name, self.wrap(reduce_scatter, "reduce-scatter", 0))
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
            setattr(mappings, name, reduce_scatter)


SYNC_METHODS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__float__", "__int__")


class HostSyncCounter:
    """Counts the Tensor methods that wait for the device (on a GPU), by the source line calling them."""

    def __init__(self):
        self.lines = Counter()
        self.active = False

    def _where(self) -> str | None:
        frame = sys._getframe(2)
        path = os.path.abspath(frame.f_code.co_filename)
        if os.sep.join(("torch", "optim", "")) in path:
            return None  # torch AdamW's CPU step counters: on a GPU DeepSpeed runs FusedAdam, without them
        for prefix in (ROOT + os.sep, os.path.dirname(os.path.dirname(torch.__file__)) + os.sep):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return f"{path}:{frame.f_lineno}"

    def wrap(self, fn):
        def counted(*a, **kw):
            where = self._where() if self.active else None
            if where is not None:
                self.lines[where] += 1
            return fn(*a, **kw)

        return counted

    @contextlib.contextmanager
    def installed(self):
        saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
        nonzero = torch.nonzero
        for name, fn in saved.items():
            setattr(torch.Tensor, name, self.wrap(fn))
        torch.nonzero = self.wrap(nonzero)
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)
            torch.nonzero = nonzero


def _cpu_sdpa_flops():
    """torch.utils.flop_counter counts the CUDA attention kernels only; the CPU flash kernel does the same work."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw:
            fc.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, out_shape=None, **kw:
            fc.sdpa_backward_flop_count(g, q, k, v)}


CPU_SDPA_FLOPS = _cpu_sdpa_flops()


# ---------------------------------------------------------------------------------------------
# One layout on one rank


def _group_names(pstate) -> dict:
    names = {}
    for name, getter in (("tp", "get_tensor_model_parallel_group"), ("dp", "get_data_parallel_group"),
                         ("pp", "get_pipeline_model_parallel_group"), ("seq", "get_sequence_parallel_group"),
                         ("seq_dp", "get_sequence_data_parallel_group"), ("mp", "get_model_parallel_group")):
        with contextlib.suppress(Exception):
            names[name] = getattr(pstate, getter)()
    return names


def _parts(engine, pstate):
    """(embedding module or None, final norm or None, transformer layers on this rank)."""
    from megaclm.model.gpt import Embedding, TransformerLayer

    module = engine.module
    layers = [m for m in module.modules() if isinstance(m, TransformerLayer)]
    embedding = next((m for m in module.modules() if isinstance(m, Embedding)), None)
    head = getattr(module, "final_norm", None)
    if head is None and pstate.pp_size > 1 and pstate.is_last_stage:
        from megaclm.model.pipe import FinalNormPipe

        head = next(m for m in module.modules() if isinstance(m, FinalNormPipe))
    if pstate.pp_size > 1 and not pstate.is_first_stage:
        embedding = None  # stage > 0 keeps the tied embedding only for the head
    return embedding, head, len(layers)


def measure(rank: int, args, name: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from megaclm.config import compute_derived, parse_args
    from megaclm.config.deepspeed_json import deepspeed_config
    from megaclm.model.flops import flops_per_token
    from megaclm.training.batch import build_batch_source
    from megaclm.training.engine import build_engine, build_model, init_distributed
    from megaclm.training.loop import Progress, Trainer
    from megaclm.training.schedules import build_schedule
    from megaclm.training.metrics import MetricsLogger

    argv = shape_argv(args) + LAYOUTS[name] + ["--global-batch-size", str(MICRO * _dp_size(name))]
    cfg, _, _ = parse_args(argv, world_size=2)
    derived = compute_derived(cfg, 2, vocab_size=VOCAB)  # NullTokenizer: VOCAB - 1 ids + eod
    ds_config = deepspeed_config(cfg, derived, cuda=False)
    pstate = init_distributed(cfg)
    vocab = derived.padded_vocab_size
    engine = build_engine(cfg, build_model(cfg, vocab, pstate, ds_config), pstate, ds_config)
    data = build_batch_source(cfg, derived, VOCAB - 1, pstate)
    schedule = build_schedule(cfg.optimizer, cfg.scheduler, derived.train_iters, derived.tokens_per_step,
                              cfg.training.train_tokens, derived.global_batch_size)
    metrics = MetricsLogger(cfg.logging, writer=False, metrics_file=None, total_iters=derived.train_iters,
                            start_iter=0, run_config=cfg.to_dict(), default_wandb_dir=None)
    progress = Progress()
    trainer = Trainer(cfg, derived, engine, pstate, data, schedule, metrics, progress,
                      flops_per_token=lambda seq: flops_per_token(cfg.model, vocab, seq), peak_tflops=None,
                      checkpoint_meta={})

    def step():
        trainer._set_lr()
        loss, _ = trainer.train_step(cfg.data.seq_length)
        data.advance()
        progress.iteration += 1
        return loss

    step()  # warm-up: DeepSpeed's lazy buffers, the data loader's workers
    embedding, head, n_layers = _parts(engine, pstate)
    saved = SavedActivations(engine.module, embedding, head)
    colls = CollectiveCounter(_group_names(pstate))
    syncs = HostSyncCounter()
    flops = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    with colls.installed(), syncs.installed(), saved.installed():
        colls.active = syncs.active = True
        with flops:
            loss = step()
        colls.active = syncs.active = False
    saved.close()
    metrics.close()
    first = saved.calls[0]
    return {"layout": name, "rank": rank, "loss": loss, "layers": n_layers,
            "act_per_layer": first["layers"] / n_layers, "act_other": first["other"],
            "collectives": [{"kind": k, "group": g, "calls": colls.calls[(k, g)], "bytes": colls.bytes[(k, g)]}
                            for k, g in sorted(colls.calls)],
            "flops": flops.get_total_flops(), "model_flops": flops_per_token(cfg.model, vocab, cfg.data.seq_length)
            * cfg.data.seq_length * derived.global_batch_size,
            "syncs": dict(syncs.lines)}


def _dp_size(name: str) -> int:
    return 1 if name.startswith(("tp2", "ulysses", "ring", "pp2")) else 2


def worker(rank: int, port: int, args, names, out) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    for name in names:
        try:
            out.put((rank, name, measure(rank, args, name)))
        except BaseException:  # to the parent, which would otherwise wait for it
            out.put((rank, name, traceback.format_exc()))
            return


def run_layouts(args, names) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, args, names, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = defaultdict(dict)
    for _ in range(2 * len(names)):
        rank, name, result = out.get(timeout=args.timeout)
        if isinstance(result, str):
            for p in procs:
                p.kill()
            raise RuntimeError(f"{name}, rank {rank} failed:\n{result}")
        results[name][rank] = result
    for p in procs:
        p.join()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.seq = 2, 64, 176, 64
    names = args.layouts.split(",")
    results = run_layouts(args, names)
    for name in names:
        print(name, json.dumps(results[name][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
