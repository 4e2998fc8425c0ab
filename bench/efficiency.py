#!/usr/bin/env python
"""GPU efficiency measured on the CPU: activation bytes, collectives, FLOPs and host syncs of one optimizer
step, for each parallel layout, against their analytic minimum.

    python bench/efficiency.py            # Llama shape: 4 layers, hidden 256, GQA 8/4 heads, SwiGLU, seq 512, fp32
    python bench/efficiency.py --quick    # 2 layers, hidden 64, seq 64: the CI audit (asserts the budgets below)
    python bench/efficiency.py --json F   # also every number as JSON in F

Every layout runs on the same 2 gloo ranks, spawned once, through megaclm's own path: pretrain_gpt.py's
flags parsed (--mock-data), init_distributed, build_model, build_engine (DeepSpeed), and the trainer's
`train_step` (megaclm.training.step) on the mock data: 2 micro-batches per optimizer step. One warm-up
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

Ideal values (b = 1 micro-batch, s sequence, h hidden, L layers, a/g query/kv heads of d dims, m = 2
micro-batches per step, P the rank's trainable parameters, e = 4 bytes, t = n = 2 ranks):
  activations (ratio to tp1): megaclm.model.flops.layer_activation_bytes with reference_ops (the
    estimate's --estimate-for cpu) for the layout over the same for tp1 (Korthikanti et al. 2022):
    tp2         norm inputs and the QKV/MLP inputs stay whole, the rest is split: (whole + split/t) / (whole + split)
    tp2-sp      1/t                          tp2-sp-sel   1/t, less the core attention's own saves
    recompute   the layer input only, s*b*h*e / tp1's     ulysses2   1/n
    ring2       1/n + the gathered keys/values + its explicit-score blocks (2n+1 per rank, fp32 scores and
                probabilities)                            ep2-moe    the MoE layer's (k experts per token)
    pp2, zero1/2/3, lora    1
  collectives per optimizer step (calls, bytes; X = b*s*h*e, the vocab-parallel loss's 3 fp32 per token):
    tp1, recompute, lora  one all-reduce of the (trainable) gradients, P*e
    tp2       per layer and micro-batch 2 all-reduces of X forward, 2 backward; the embedding's forward and the
              output layer's backward ones; + the loss, the grad norm
    tp2-sp    per layer and micro-batch: forward 2 all-gathers + 2 reduce-scatters of X; backward 2 re-gathers
              of the kept local inputs + 2 all-gathers + 2 reduce-scatters (Megatron's count); the embedding's
              reduce-scatter and all-gather, the output layer's 2 all-gathers and reduce-scatter; once per step
              one all-reduce of the SP-replicated gradients, (2L+1)*h*e
    ulysses2  per layer and micro-batch 4 all-to-alls (q, k, v, out) forward, 4 backward, of my s/n tokens;
              + DP gradients, the position ids' all-gather and the loss's token count
    ring2     per layer and micro-batch: all-gather K and V forward, reduce-scatter their gradients backward
    pp2       rank 0: m sends of X forward, m receives of its gradient (+ the loss broadcast, the grad norm,
              the activation shape DeepSpeed resends each step)
    zero1     one reduce-scatter of the gradients and one all-gather of the parameters per parameter group
    zero2     a reduce-scatter per micro-batch (ZeRO-2 reduces gradients as backward makes them) + the all-gather
    zero3     a reduce-scatter per micro-batch + the parameters all-gathered forward and backward per micro-batch
              (an upper bound: DeepSpeed keeps them gathered for backward within stage3_max_live_parameters)
    ep2-moe   per MoE layer and micro-batch 5 all-to-alls (counts, dispatch, combine; both backward) of k*X;
              ZeRO-1 of the dense parameters (the experts are not data-parallel at EP = DP = 2)
  flops   model FLOPs plus what the kernels redo: flash attention's backward recomputes QK^T (+2 a d s per layer
          and token), the fused output-layer cross-entropy at TP=1 recomputes the logits (+2 V h); selective
          recompute + the core attention's forward, full recompute + the layers' forward; LoRA - the frozen
          weights' gradients (and the first QKV's input gradient) + the adapters'; ring skips the blocks
          wholly in the future (it computes a (2n+1)/4n share)
  syncs   the loss and the grad norm (+ DeepSpeed's overflow check, + the trainer's stop flags: 2 today)

Budgets (asserted with --quick, the CI audit; exit status 1 when one is exceeded): activations <= 1.05 x
ideal; collective bytes <= 1.1 x analytic; calls <= analytic + COLL_SLACK; FLOPs within 2% of expected; host
syncs <= SYNC_BUDGET per step (+ KNOWN). KNOWN excesses, allowed and listed in the README until fixed:
  ring2    1 host sync per layer and micro-batch (megaclm.parallel.context fetches its chunk bounds; it made 2
           per block before issue 24); its explicit-score blocks are in the ideal (the estimate counts them)
  ep2-moe  activations up to 1.1 x (the mock batch at init routes unevenly; the ideal assumes balance);
           2 host syncs per MoE layer and micro-batch (the dropless routing's nonzero, the all-to-all's split
           sizes; 4 before issue 24), + 1 (DeepSpeed's overflow check of the expert group)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import sys
import traceback
from collections import defaultdict

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficiency_probes import CPU_SDPA_FLOPS, CollectiveCounter, HostSyncCounter, SavedActivations  # noqa: E402

VOCAB = 1024
MICRO = 2  # micro-batches per optimizer step
ACT_BUDGET, BYTES_BUDGET, FLOPS_TOLERANCE = 1.05, 1.1, 0.02
COLL_SLACK = 4  # calls DeepSpeed adds per step besides the analytic ones (e.g. its overflow / norm checks)
SYNC_BUDGET = 6  # per step: the loss, the grad norm, DeepSpeed's overflow checks, the trainer's stop flags (2)
KNOWN_ACT_EXCESS = {"ep2-moe": 1.1}  # see KNOWN in the module docstring

LORA_RANK = 8
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
    "ep2-moe": ["--zero-stage", "1", "--num-experts", "4", "--moe-router-topk", "2",
                "--expert-model-parallel-size", "2"],
    "lora": ["--zero-stage", "0", "--lora-rank", str(LORA_RANK)],
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
# One layout on one rank


def _group_names(pstate) -> dict:
    names = {}
    for name, getter in (("tp", "get_tensor_model_parallel_group"), ("dp", "get_data_parallel_group"),
                         ("pp", "get_pipeline_model_parallel_group"), ("seq", "get_sequence_parallel_group"),
                         ("seq_dp", "get_sequence_data_parallel_group"), ("mp", "get_model_parallel_group")):
        with contextlib.suppress(Exception):
            names[name] = getattr(pstate, getter)()
    return names


def _parts(engine):
    """(embedding module or None, final norm or None, transformer layers on this rank): GPTModel's and a
    pipeline stage's alike (None where another stage holds the piece)."""
    module = engine.module
    return module.embedding, module.final_norm, len(module.layers)


@dataclasses.dataclass
class Run:
    """A trainer built as pretrain_gpt.py builds it, and `step()`: what Trainer.train does every iteration,
    without logging, evaluation and saving."""

    cfg: object
    derived: object
    engine: object
    pstate: object
    trainer: object
    data: object
    metrics: object
    progress: object
    vocab: int

    def step(self):
        self.trainer.train_step.set_lr(self.trainer.schedule, self.progress)
        loss, _ = self.trainer.train_step(self.progress.consumed_samples, self.cfg.data.seq_length)
        self.data.advance()
        self.progress.iteration += 1
        self.trainer.callbacks.should_stop(self.trainer)
        return loss


def build_run(argv: list[str], world_size: int = 2, lora_rank: int = 0) -> Run:
    """pretrain_gpt.py's flags -> the distributed trainer on this rank (the process group is initialised here;
    `lora_rank`: adapters on the random init, which pretrain_gpt.py refuses without a base checkpoint)."""
    from megaclm.config import compute_derived, parse_args
    from megaclm.config.deepspeed_json import deepspeed_config
    from megaclm.model.flops import flops_per_token
    from megaclm.training.batch import build_batch_source
    from megaclm.training.engine import build_engine, build_model, init_distributed
    from megaclm.training.loop import Trainer
    from megaclm.training.progress import Progress
    from megaclm.training.metrics import MetricsLogger
    from megaclm.training.schedules import build_schedule

    cfg, _, _ = parse_args(argv, world_size=world_size)
    if lora_rank:
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, lora_rank=lora_rank))
    derived = compute_derived(cfg, world_size, vocab_size=VOCAB)  # NullTokenizer: VOCAB - 1 ids + eod
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
    return Run(cfg, derived, engine, pstate, trainer, data, metrics, progress, vocab)


def measure(rank: int, args, name: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from megaclm.model.flops import flops_per_token

    argv = shape_argv(args) + LAYOUTS[name] + ["--global-batch-size", str(MICRO * _dp_size(name))]
    lora = "--lora-rank" in argv  # LoRA needs a base checkpoint to train from: adapters on the random init here
    if lora:
        argv = argv[:argv.index("--lora-rank")] + argv[argv.index("--lora-rank") + 2:]
    run = build_run(argv, lora_rank=LORA_RANK if lora else 0)
    cfg, derived, engine, pstate, vocab = run.cfg, run.derived, run.engine, run.pstate, run.vocab
    step = run.step
    step()  # warm-up: DeepSpeed's lazily built buffers and groups
    embedding, head, n_layers = _parts(engine)
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
    run.metrics.close()
    first = saved.calls[0]
    params = [p for p in engine.module.parameters() if p.requires_grad]
    fpt = flops_per_token(cfg.model, vocab, cfg.data.seq_length)
    return {"layout": name, "rank": rank, "loss": loss, "layers": n_layers, "model": dataclasses.asdict(cfg.model),
            "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "expert_params": sum(getattr(p, "ds_numel", p.numel()) for p in params
                                 if not getattr(p, "allreduce", True)),
            "act_per_layer": first["layers"] / n_layers, "act_other": first["other"],
            "collectives": [{"kind": k, "group": g, "calls": colls.calls[(k, g)], "bytes": colls.bytes[(k, g)]}
                            for k, g in sorted(colls.calls)],
            "flops": flops.get_total_flops(), "model_flops_per_token": fpt,
            "model_flops": fpt * cfg.data.seq_length * derived.global_batch_size,
            "syncs": dict(syncs.lines)}


def _dp_size(name: str) -> int:
    return 1 if name.startswith(("tp2", "ulysses", "ring", "pp2")) else 2


def worker(rank: int, port: int, args, names, out, measure_fn=None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    for name in names:
        try:
            out.put((rank, name, (measure_fn or measure)(rank, args, name)))
        except BaseException:  # to the parent, which would otherwise wait for it
            out.put((rank, name, traceback.format_exc()))
            return


def run_layouts(args, names, measure_fn=None) -> dict:
    """{layout: {rank: measure_fn(rank, args, layout)}} from 2 ranks spawned once (forkserver); `measure_fn`
    (default `measure`) must be importable by the children (a module-level function)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, args, names, out, measure_fn)) for r in range(2)]
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


# ---------------------------------------------------------------------------------------------
# Analytic minimum (the module docstring's formulas), from rank 0's view


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    seq: int
    heads: int = 8
    kv_heads: int = 4
    micro: int = MICRO  # micro-batches per optimizer step and rank
    e: int = 4  # fp32
    topk: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def model(self, fields: dict, **overrides):
        """The ModelConfig a worker reported (as a dict), with `overrides`."""
        from megaclm.config.model import ModelConfig

        return ModelConfig(**{**fields, **overrides})


def estimate_act_per_layer(name: str, sh: Shape, fields: dict) -> float:
    """megaclm's memory estimate of one layer's activations on a rank, per micro-batch, for the layout
    (megaclm.model.flops.layer_activation_bytes; reference_ops: the PyTorch ops this CPU run executes)."""
    from megaclm.model.flops import MemorySetup, layer_activation_bytes

    model, setup = sh.model(fields), {}
    if name.startswith("tp2"):
        setup = dict(tensor_parallel=2, sequence_parallel="sp" in name)
    if name == "tp2-sp-sel":
        model = sh.model(fields, recompute_granularity="selective")
    if name == "recompute":  # only the layer's input (megaclm.model.flops.estimate_memory's full recompute)
        return sh.seq * sh.hidden * sh.e
    if name in ("ulysses2", "ring2"):
        setup = dict(seq_split=2, ring=name == "ring2")
    if name == "ep2-moe":
        model = sh.model(fields, num_experts=4, moe_router_topk=sh.topk)
    return layer_activation_bytes(model, MemorySetup(seq_length=sh.seq, precision="fp32", reference_ops=True, **setup))


def analytic_collectives(name: str, sh: Shape, r: dict) -> tuple[int, int]:
    """(calls, bytes) one optimizer step needs on rank 0 (groups of one rank excluded), with the trainer's
    all-reduce of its 3 stop flags (signal, time limit, checkpoint writer; megaclm.training.callbacks StopConditions)."""
    calls, nbytes = _analytic_collectives(name, sh, r)
    return calls + 1, nbytes + 3 * 4


def _analytic_collectives(name: str, sh: Shape, r: dict) -> tuple[int, int]:
    L, m, e, s, h = sh.layers, sh.micro, sh.e, sh.seq, sh.hidden
    X = s * h * e  # one (b, s, h) activation of the whole sequence, b = 1
    P = r["trainable"] * e
    ce = 3 * s * 4  # vocab-parallel cross-entropy: max, sum of exp, target logit (fp32, per token)
    if name in ("tp1", "recompute", "lora"):
        return 1, P  # the data-parallel all-reduce of the gradients
    if name == "tp2":  # per layer 2 all-reduces forward, 2 backward; embedding forward, output layer backward
        return m * (4 * L + 2 + 3) + 1, m * ((4 * L + 2) * X + ce) + 4  # + the grad norm over tp
    if name in ("tp2-sp", "tp2-sp-sel"):
        # per layer: forward 2 all-gathers + 2 reduce-scatters; backward 2 re-gathers of the kept local inputs,
        # 2 all-gathers + 2 reduce-scatters; embedding reduce-scatter / all-gather; output layer 2 all-gathers
        # + 1 reduce-scatter; then one all-reduce of the SP-replicated gradients and the grad norm
        sp_grads = (2 * L + 1) * h * e
        return m * (10 * L + 5 + 3) + 2, m * ((10 * L + 5) * X + ce) + sp_grads + 4
    if name == "ulysses2":  # per layer 4 all-to-alls (q, k, v, out) forward and 4 backward, each of my T/2 tokens
        n, a, g, d = 2, sh.heads, sh.kv_heads, sh.head_dim
        a2a = 2 * (2 * a + 2 * g) * d * (s // n) * e
        # + per micro-batch the position ids' all-gather and the loss's token count; the DP gradients
        return m * (8 * L + 2) + 1, m * (L * a2a + s * 8 + 4) + P
    if name == "ring2":  # per layer all-gather K and V forward, reduce-scatter their gradients backward
        kv = sh.kv_heads * sh.head_dim * s * e
        return m * (4 * L + 1) + 1, m * (4 * L * kv + 4) + P
    if name == "pp2":  # rank 0 = stage 0: sends (b, s, h) forward, receives its gradient; loss broadcast, norm;
        return 2 * m + 2 + 2, 2 * m * X + 8 + 4 + 2 * 512  # DeepSpeed resends the activation's shape every step
    groups = 2  # optimizer parameter groups (decay, no decay): ZeRO communicates each on its own
    if name == "zero1":  # reduce-scatter the gradients, all-gather the updated parameters, once per step
        return 2 * groups, 2 * P
    if name == "zero2":  # ZeRO-2 reduce-scatters each micro-batch's gradients as backward makes them (its point)
        return m + groups, m * P + P
    if name == "zero3":  # + the parameters all-gathered forward and backward in every micro-batch
        return 3 * m, m * P + 2 * m * P
    if name == "ep2-moe":  # per MoE layer: all-to-all of the counts, dispatch and combine forward, both backward
        dense = P - r["expert_params"] * e
        return 5 * L * m + 2 * groups, 4 * L * m * s * sh.topk * h * e + 2 * dense
    raise KeyError(name)


def expected_flops_ratio(name: str, sh: Shape, r: dict) -> float:
    """Executed over model FLOPs. Beyond the model's 6N + 12 L a d T per token: flash attention's backward
    recomputes the scores (+ 2 a d T per layer); the fused output-layer cross-entropy (TP=1) recomputes the
    logits in backward (+ 2 V h); selective recompute adds the core attention's forward (+ 4 a d T per layer),
    full recompute the layers' forward (+ 2 N_layer + 4 a d T per layer); LoRA computes no gradient for the
    frozen weights (- 2 N) and trains the adapters (+ 6 N_adapters)."""
    from megaclm.model.flops import count_parameters

    count = count_parameters(sh.model(r["model"]), VOCAB)
    attn = sh.heads * sh.head_dim * sh.seq
    extra = 2 * attn * sh.layers
    if name == "ring2":  # explicit-score blocks (no flash recompute), those wholly in the future skipped
        n = 2
        extra = -12 * attn * sh.layers * (1 - (2 * n + 1) / (4 * n))
    if not name.startswith(("tp2", "pp2")):
        extra += 2 * VOCAB * sh.hidden
    if name == "tp2-sp-sel":
        extra += 4 * attn * sh.layers
    if name == "recompute":
        extra += 2 * count.layer * sh.layers + 4 * attn * sh.layers
    if name == "lora":  # and the first layer's QKV input (the frozen embedding's output) needs no gradient
        qkv = sh.hidden * (sh.heads + 2 * sh.kv_heads) * sh.head_dim
        extra += 6 * r["trainable"] - 2 * count.flops_params - 2 * qkv
    return 1 + extra / r["model_flops_per_token"]


def audit(name: str, sh: Shape, ranks: dict, tp1_model: dict) -> dict:
    r = ranks[0]
    calls = sum(c["calls"] for c in r["collectives"])
    nbytes = sum(c["bytes"] for c in r["collectives"])
    a_calls, a_bytes = analytic_collectives(name, sh, r)
    estimate = estimate_act_per_layer(name, sh, tp1_model)
    return {"layout": name, "act_per_layer": r["act_per_layer"], "estimate_act_per_layer": estimate,
            "ideal_act_ratio": estimate / estimate_act_per_layer("tp1", sh, tp1_model),
            "calls": calls, "analytic_calls": a_calls, "bytes": nbytes, "analytic_bytes": a_bytes,
            "flops_ratio": sum(x["flops"] for x in ranks.values()) / r["model_flops"],
            "expected_flops_ratio": expected_flops_ratio(name, sh, r),
            "syncs": sum(r["syncs"].values()), "sync_lines": r["syncs"], "collectives": r["collectives"]}


def table(rows: list[dict]) -> str:
    tp1 = next(r for r in rows if r["layout"] == "tp1")["act_per_layer"]
    lines = [f"{'layout':12s}{'act/tp1':>9s}{'ideal':>7s}{'x':>6s}{'calls':>7s}{'ideal':>7s}{'MB':>8s}{'ideal':>8s}"
             f"{'x':>6s}{'flops':>7s}{'expect':>8s}{'syncs':>7s}"]
    for r in rows:
        ratio = r["act_per_layer"] / tp1
        r["act_ratio"], r["act_excess"] = ratio, ratio / r["ideal_act_ratio"]
        r["bytes_excess"] = r["bytes"] / max(r["analytic_bytes"], 1)
        lines.append(f"{r['layout']:12s}{ratio:9.3f}{r['ideal_act_ratio']:7.3f}{r['act_excess']:6.2f}{r['calls']:7d}"
                     f"{r['analytic_calls']:7d}{r['bytes'] / 1e6:8.3f}{r['analytic_bytes'] / 1e6:8.3f}"
                     f"{r['bytes_excess']:6.2f}{r['flops_ratio']:7.3f}{r['expected_flops_ratio']:8.3f}{r['syncs']:7d}")
    return "\n".join(lines)


def sync_allowance(name: str, sh: Shape) -> int:
    """Host syncs a layout needs beyond SYNC_BUDGET, per step (KNOWN in the module docstring)."""
    if name == "ep2-moe":  # routing's nonzero, the split sizes; + DeepSpeed's overflow check of the expert group
        return 2 * sh.layers * sh.micro + 1
    if name == "ring2":  # the chunk bounds, once per layer and micro-batch
        return sh.layers * sh.micro
    return 0


def budget_failures(rows: list[dict], sh: Shape) -> list[str]:
    """The CI guards of the module docstring."""
    bad = []
    for r in rows:
        n = r["layout"]
        if r["act_excess"] > KNOWN_ACT_EXCESS.get(n, ACT_BUDGET):
            bad.append(f"{n}: activations {r['act_ratio']:.3f} of tp1's > {KNOWN_ACT_EXCESS.get(n, ACT_BUDGET)} x "
                       f"ideal {r['ideal_act_ratio']:.3f}")
        if r["bytes"] > BYTES_BUDGET * r["analytic_bytes"]:
            bad.append(f"{n}: collective bytes {r['bytes']} > {BYTES_BUDGET} x analytic {r['analytic_bytes']}")
        if r["calls"] > r["analytic_calls"] + COLL_SLACK:
            bad.append(f"{n}: {r['calls']} collective calls > analytic {r['analytic_calls']} + {COLL_SLACK}")
        if abs(r["flops_ratio"] / r["expected_flops_ratio"] - 1) > FLOPS_TOLERANCE:
            bad.append(f"{n}: FLOPs ratio {r['flops_ratio']:.3f}, expected {r['expected_flops_ratio']:.3f}")
        if r["syncs"] > SYNC_BUDGET + sync_allowance(n, sh):
            bad.append(f"{n}: {r['syncs']} host syncs per step > {SYNC_BUDGET + sync_allowance(n, sh)}: "
                       f"{r['sync_lines']}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="Comma-separated subset (tp1 is always run).")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per rank.")
    p.add_argument("--timeout", type=float, default=900.0, help="Seconds to wait for one layout.")
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 64, seq 64; exit 1 if a budget is exceeded.")
    p.add_argument("--json", default=None, help="Write every number to this file.")
    p.add_argument("--audit", default=None, metavar="JSON", help="Audit the measurements saved by --json instead.")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.ffn, args.seq = 2, 64, 176, 64
    names = ["tp1"] + [n for n in args.layouts.split(",") if n != "tp1"]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"--layouts: unknown {','.join(unknown)}; layouts are {','.join(LAYOUTS)}")
    sh = Shape(args.layers, args.hidden, args.ffn, args.seq)
    if args.audit:  # measured by an earlier run (e.g. of another checkout), audited by this one
        with open(args.audit) as f:
            saved = json.load(f)
        sh, results = Shape(**saved["shape"]), {n: {int(k): v for k, v in r.items()} for n, r in saved["ranks"].items()}
        names = [n for n in names if n in results]
    else:
        results = run_layouts(args, names)
    if args.json:  # the raw measurements first: --audit re-reads them
        with open(args.json, "w") as f:
            json.dump({"shape": dataclasses.asdict(sh), "ranks": results}, f)
    rows = [audit(n, sh, results[n], results["tp1"][0]["model"]) for n in names]
    print(table(rows))
    for r in rows:
        if r["syncs"]:
            print(f"{r['layout']:12s}syncs: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["sync_lines"].items())))
    bad = budget_failures(rows, sh)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": dataclasses.asdict(sh), "ranks": results, "rows": rows, "over_budget": bad}, f,
                      indent=1)
    for line in bad:
        print(f"over budget: {line}")
    return 1 if bad and args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
