"""Prove a parallel layout before the big run: the user's layout against a single-rank reference.

    python tools/check_layout.py --world-size 8 <the pretrain_gpt.py flags or --config of the real run>
    LAUNCHER="python tools/check_layout.py --world-size 8" bash examples/pretrain_llama_7b.sh

What it does, in order:
1. Parses the run's flags/YAML exactly as pretrain_gpt.py does (at the run's world size), so a layout the
   trainer would refuse is refused here with the same message.
2. Shrinks the model while keeping every divisibility the layout needs (`shrink_model`): pp x (1 or 2)
   layers; tp x Ulysses x k query groups with the run's GQA ratio (at most 4) and at least 4 heads of
   size 16; the run's FFN/hidden ratio rounded to tp x 8; ep x (1 or 2) experts; a sequence of 64 tokens
   rounded up to what SP / Ulysses / ring chunks need; dropout 0 (its random stream depends on the
   layout). The data become --mock-data and the tokenizer a NullTokenizer (no files needed), the global
   batch micro (at most 2) x dp x the run's accumulation steps (at most 4); the lr starts at the run's peak (no warmup) and decays over
   the steps. Everything else (precision, ZeRO stage and offload, recomputation, LoRA, MoE routing,
   position embeddings, masks, curriculum, kernels, --torch-compile, --async-save) is the run's.
3. Scales axes down where the layout needs more ranks than `--max-ranks` (default: the local GPUs, else
   8 CPU processes): data parallel first (to 2, to 1 if still too many), then sequence split, pipeline and
   tensor parallel to 2 each; every change is printed.
4. Writes one random initial checkpoint (tp 1, the vocabulary padded for the layout's tp) and trains from it
   (--finetune) twice with pretrain_gpt.py's `main`, one process per rank (forked from a server that
   imported megaclm once; env:// on 127.0.0.1, gloo on CPU): the layout, and the reference on one rank (tp = pp = 1, no sequence split or experts split, ZeRO-0
   in fp32 / ZeRO-1 in 16-bit, no recomputation, no --torch-compile, no offload or overlap). The same weights, global
   batch, data order and per-token loss (megaclm.training.loss) make their numbers comparable.
5. Compares per step the loss, grad norm and lr (metrics.jsonl of both), and after the last step the full
   fp32 weights of both final checkpoints (megaclm.checkpoint.shards.load_full_state_dict) per parameter
   family; prints a table and a verdict; exit 0 (pass) or 1 (fail).

Tolerances (TOLERANCES, relative to the reference's value; weights: absolute, in units of lr x steps):
    fp32: loss 2e-5, grad norm 2e-4, lr 1e-6, weights 0.2 lr x steps
    bf16/fp16: loss 2e-2, grad norm 5e-2, lr 1e-6, weights 2.0 lr x steps
fp32 differences come from float reduction order only (measured: 1e-7 relative for the loss and grad
norm, 1e-7 for the weights at TP 2 x DP 2 + SP); 16-bit ones from rounding at different places (measured
at TP 2 x PP 2 x DP 2 bf16: 1e-5 loss, 1e-3 grad norm, 0.8 lr x steps weights). Adam moves a weight by
about lr x sign(gradient) per step, so gradients that differ by rounding can at most flip a few signs:
2 lr x steps bounds that. In fp32 too, an element whose gradient is about Adam's eps (1e-8: an embedding row
of a token seen once) moves by a fraction of lr that rounding-level gradient differences change: measured
0.062 lr x steps for 1 element of 65536 at TP 2 x PP 2 + SP (fuzz seed 3000, case 127), hence 0.2. The check
therefore only catches gross weight errors (a family not updated is 1 lr x steps off); a wrong gradient
scale shows in the grad norm, a wrong direction in the losses of the steps after the first.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any

import torch

from megaclm.checkpoint.offline import write_checkpoint
from megaclm.checkpoint.shards import load_full_state_dict
from megaclm.config import MegaclmConfig, parse_args
from megaclm.config.arguments import dump_yaml
from megaclm.config.derived import pad_vocab_size
from megaclm.config.derived import Derived
from megaclm.logging.metrics_file import last_per_iteration, read_rows
from megaclm.model.gpt import GPTModel
from megaclm.tokenizer import build_tokenizer_from_config
from megaclm.training.engine import free_port
from megaclm.utils.errors import UserError

HEAD_DIM = 16
SEQ = 64
VOCAB = 1000
TOLERANCES = {"fp32": {"loss": 2e-5, "grad_norm": 2e-4, "lr": 1e-6, "weights": 0.2},
              "16-bit": {"loss": 2e-2, "grad_norm": 5e-2, "lr": 1e-6, "weights": 2.0}}
# Replaced for both runs: no files needed, nothing written outside the work directory.
DATA = {"mock_data": True, "data_path": [], "data_path_file": None, "train_data_path": [], "valid_data_path": [],
        "test_data_path": [], "data_mixing_schedule": [], "num_workers": 0, "data_cache_path": None}
TOKENIZER = {"tokenizer_type": "NullTokenizer", "vocab_size": VOCAB, "vocab_file": None, "merge_file": None,
             "tokenizer_model": None}


@dataclasses.dataclass
class Axes:
    """World = tp x seq x dp x pp ranks; `seq` is the Ulysses or ring degree (`ring` tells which)."""

    tp: int
    pp: int
    dp: int
    seq: int = 1
    ring: bool = False
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.seq

    def text(self) -> str:
        kind = "ring" if self.ring else "ulysses"
        return (f"TP {self.tp} x PP {self.pp} x DP {self.dp}" + (f" x {kind} {self.seq}" if self.seq > 1 else "")
                + (f", EP {self.ep}" if self.ep > 1 else "") + f" = {self.world} ranks")


def run_axes(cfg: MegaclmConfig, derived: Derived) -> Axes:
    p = cfg.parallel
    return Axes(tp=derived.tensor_model_parallel_size, pp=derived.pipeline_model_parallel_size,
                dp=derived.data_parallel_size, seq=derived.seq_split_size, ring=p.context_parallel_size > 1,
                ep=p.expert_model_parallel_size)


def scale_axes(axes: Axes, max_ranks: int) -> tuple[Axes, list[str]]:
    """The layout to run with at most `max_ranks` ranks, and one note per axis scaled down."""
    new, notes = dataclasses.replace(axes), []

    def cut(name: str, value: int, why: str) -> None:
        notes.append(f"{name} {getattr(new, name)} -> {value} ({why})")
        setattr(new, name, value)

    if new.ep > 2:
        cut("ep", 2, "2 expert-parallel ranks exercise the token exchange")
    if new.dp > max(2, new.ep):
        cut("dp", max(2, new.ep), "2 data-parallel replicas exercise the gradient reduction")
    for name in ("dp", "seq", "pp", "tp"):
        if new.world > max_ranks and getattr(new, name) > 2:
            cut(name, 2, f"--max-ranks {max_ranks}")
    fewest_dp = new.ep // math.gcd(new.ep, new.seq)  # expert-parallel ranks are data-parallel or sequence ranks
    if new.world > max_ranks and new.dp > fewest_dp:
        cut("dp", fewest_dp, f"--max-ranks {max_ranks}")
    if new.world > max_ranks:
        raise UserError(f"the layout needs {new.world} ranks at its smallest ({new.text()}) and --max-ranks is "
                        f"{max_ranks}; raise --max-ranks (CPU processes are cheap for the shrunk model)")
    return new, notes


def _round_up(x: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(x / multiple)) * multiple)


def shrink_model(model: Any, axes: Axes) -> dict:
    """The model section, shrunk for `axes` (see the module docstring)."""
    m = dataclasses.asdict(model)
    groups_ratio = max(1, min(4, model.num_attention_heads // model.num_kv_heads))
    split = axes.tp * (1 if axes.ring else axes.seq)  # Ulysses gives every rank whole heads
    groups = split * max(1, math.ceil(4 / (split * groups_ratio)))  # at least 4 heads
    heads = groups * groups_ratio
    hidden = heads * HEAD_DIM
    layers_per_stage = 2 if model.num_layers >= 2 * axes.pp else 1
    m.update(num_layers=axes.pp * layers_per_stage, hidden_size=hidden, num_attention_heads=heads,
             num_query_groups=groups if model.num_query_groups is not None else None, kv_channels=None,
             ffn_hidden_size=_round_up(model.ffn_size / model.hidden_size * hidden, 8 * axes.tp),
             max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0)
    m["recompute_num_layers"] = min(model.recompute_num_layers, layers_per_stage)
    if model.window_size is not None:
        m["window_size"] = min(model.window_size, SEQ // 2)
    if model.num_experts is not None:
        m["num_experts"] = axes.ep * (2 if model.num_experts >= 2 * axes.ep else 1)
        m["moe_router_topk"] = min(model.moe_router_topk, m["num_experts"])
        m["moe_ffn_hidden_size"] = _round_up(model.moe_ffn_size / model.hidden_size * hidden, 8)
        if model.moe_shared_expert_intermediate_size:
            m["moe_shared_expert_intermediate_size"] = _round_up(
                model.moe_shared_expert_intermediate_size / model.hidden_size * hidden, 8 * axes.tp)
    return m


def _seq_length(cfg: MegaclmConfig, axes: Axes) -> int:
    multiple = 1
    if cfg.parallel.sequence_parallel:
        multiple = math.lcm(multiple, axes.tp)
    if axes.seq > 1:
        multiple = math.lcm(multiple, 2 * axes.seq if axes.ring else axes.seq * axes.tp)
    if cfg.data.curriculum_seqlen_start is not None:
        multiple = math.lcm(multiple, cfg.data.curriculum_seqlen_multiple)
    return _round_up(SEQ, multiple)


@dataclasses.dataclass
class Plan:
    layout: dict  # the config tree of the layout run
    reference: dict  # ... and of the single-rank reference
    axes: Axes
    notes: list[str]
    padded_vocab: int
    precision: str
    steps: int


def make_plan(argv: list[str], world_size: int, max_ranks: int, steps: int) -> Plan:
    # The run's --load (its base model or resume directory) need not exist here: the check trains from its own
    # initial weights, with --finetune (so LoRA runs validate as they would with their base).
    cfg, derived, _ = parse_args(argv, prog="check_layout.py", world_size=world_size,
                                 overrides={"data": DATA, "tokenizer": TOKENIZER,
                                            "checkpoint": {"load": "<the check's initial weights>", "finetune": True}})
    axes, notes = scale_axes(run_axes(cfg, derived), max_ranks)
    tree = cfg.to_dict()
    old = cfg.model
    tree["model"] = shrink_model(cfg.model, axes)
    new = tree["model"]
    notes.insert(0, f"model {old.num_layers} layers, hidden {old.hidden_size}, {old.num_attention_heads} heads / "
                    f"{old.num_kv_heads} groups -> {new['num_layers']} layers, hidden {new['hidden_size']}, "
                    f"{new['num_attention_heads']} heads / {new['num_query_groups'] or new['num_attention_heads']} "
                    f"groups; dropout 0; data: mock; tokenizer: NullTokenizer {VOCAB}")
    seq = _seq_length(cfg, axes)
    mbs = min(cfg.training.micro_batch_size, 2)
    tree["parallel"].update(tensor_model_parallel_size=axes.tp, pipeline_model_parallel_size=axes.pp,
                            ds_sequence_parallel_size=axes.seq if axes.seq > 1 and not axes.ring else 1,
                            context_parallel_size=axes.seq if axes.ring else 1, expert_model_parallel_size=axes.ep)
    d = cfg.data
    tree["data"].update(DATA, seq_length=seq)
    if d.curriculum_seqlen_start is not None:
        tree["data"].update(curriculum_seqlen_start=_round_up(seq // 2, d.curriculum_seqlen_multiple),
                            curriculum_seqlen_steps=2, curriculum_seqlen_tokens=None)
    tree["tokenizer"].update(TOKENIZER)
    accum = min(derived.grad_accum_steps, 4)
    tree["training"].update(micro_batch_size=mbs, global_batch_size=mbs * axes.dp * accum, train_iters=steps,
                            train_samples=None, train_tokens=None, eval_interval=10**6, eval_iters=0,
                            exit_interval=None, exit_duration_in_mins=None, deepspeed_config=None,
                            distributed_backend=None)
    tree["scheduler"].update({k: None for k in tree["scheduler"] if k.startswith(("lr_warmup_", "lr_decay_",
                                                                                   "lr_wsd_decay_"))
                              and k not in ("lr_decay_style", "lr_wsd_decay_style")})
    tree["scheduler"]["lr_warmup_iters"] = 0  # the first step updates at the run's peak lr
    tree["checkpoint"].update(save=None, load=None, pretrained_checkpoint=None, finetune=False, save_interval=None,
                              save_total_limit=None, ckpt_step=None, use_checkpoint_args=False, save_best=False)
    tree["logging"].update(log_interval=1, metrics_file=None, tensorboard_dir=None, wandb_project=None, profile=False,
                           use_pytorch_profiler=False)
    if "lora" in tree:
        tree["lora"]["lora_dropout"] = 0.0
    reference = json.loads(json.dumps(tree))
    reference["parallel"].update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                 sequence_parallel=False, ds_sequence_parallel_size=1, context_parallel_size=1,
                                 expert_model_parallel_size=1)
    precision = cfg.precision.name
    reference["zero"].update(zero_stage=0 if precision == "fp32" else 1, offload_optimizer=False, offload_param=False,
                             overlap_grad_reduce=False)
    reference["model"]["recompute_granularity"] = None
    reference["kernels"]["torch_compile"] = False
    tokenizer = build_tokenizer_from_config(cfg.tokenizer, axes.tp)
    padded = pad_vocab_size(tokenizer.vocab_size, cfg.tokenizer.make_vocab_size_divisible_by, axes.tp)
    return Plan(tree, reference, axes, notes, padded, "fp32" if precision == "fp32" else "16-bit", steps)


# ---- running ---------------------------------------------------------------------------------------------------
def write_init(plan: Plan, out: str) -> None:
    """One random initial checkpoint (the reference's init, drawn once) that both runs --finetune from."""
    cfg = MegaclmConfig.from_dict(plan.reference)
    torch.manual_seed(cfg.training.seed)
    model = GPTModel(cfg.model, plan.padded_vocab)
    write_checkpoint(out, plan.reference, model.state_dict(), tp=1, pp=1)


def _rank_main(env: dict, config: str, log_path: str) -> None:
    """One rank of a check run: pretrain_gpt.py's `main` (the same two calls as the script) in a child of
    the forkserver, which imported torch, DeepSpeed and megaclm once: a rank starts in milliseconds instead
    of the seconds of a fresh interpreter, which is most of a small check's time on a few cores."""
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    from megaclm.training.pretrain import main
    from megaclm.utils import signals
    from megaclm.utils.errors import cli_main

    signals.install()
    cli_main(lambda: main(["--config", config]))


@functools.cache
def _forkserver() -> Any:
    """The forkserver context, its server preloading pretrain (started once per checker process)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch's import in the server: one thread per rank
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["megaclm.training.pretrain"])
    return ctx


def run_world(tree: dict, world: int, workdir: str, name: str, init: str, timeout: float) -> str:
    """`pretrain_gpt.py --config <tree>` on `world` local processes (env:// rendezvous); returns its save dir."""
    save = os.path.join(workdir, name)
    tree = json.loads(json.dumps(tree))
    tree["checkpoint"].update(save=save, load=init, finetune=True)
    config = os.path.join(workdir, f"{name}.yaml")
    with open(config, "w") as f:
        f.write(dump_yaml(tree))
    ctx, port = _forkserver(), free_port()
    procs = []
    for rank in range(world):
        env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        log = os.path.join(workdir, f"{name}.rank{rank}.log")
        procs.append(ctx.Process(target=_rank_main, args=(env, config, log)))
        procs[-1].start()
    deadline, failed = time.monotonic() + timeout, None
    while any(p.exitcode is None for p in procs) and failed is None:
        failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
        if time.monotonic() > deadline:
            failed = "timeout"
        time.sleep(0.2)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join()
    failed = failed if failed is not None else next((r for r, p in enumerate(procs) if p.exitcode != 0), None)
    if failed is not None:
        rank = 0 if failed == "timeout" else failed
        with open(os.path.join(workdir, f"{name}.rank{rank}.log")) as f:
            lines = f.readlines()
        errors = [line for line in lines if line.startswith("error: ")]
        if failed != "timeout" and procs[rank].exitcode == 2 and len(errors) == 1:
            raise UserError(errors[0][len("error: "):].strip())  # refused where it runs (e.g. a CPU-only limit)
        tail = "".join(lines[-25:])
        what = (f"did not finish in {timeout:.0f} s" if failed == "timeout"
                else f"rank {rank} exited {procs[rank].exitcode}")
        raise RunFailed(f"the {name} run {what}; its log ({workdir}/{name}.rank{rank}.log) ends:\n{tail}")
    return save


class RunFailed(RuntimeError):
    """A run of the check failed: the layout crashed (or the reference did)."""


# ---- comparing -------------------------------------------------------------------------------------------------
def step_rows(save: str) -> dict[int, dict]:
    rows = read_rows(os.path.join(save, "metrics.jsonl"))
    return {r["iteration"]: r for r in last_per_iteration(rows, "loss")}


def family(key: str) -> str:
    """The parameter family of a GPTModel key (what a layout bug usually breaks together)."""
    for needle, name in (("lora_", "lora adapters"), ("deepspeed_experts", "routed experts"),
                         ("mlp.router", "router"), ("mlp.shared", "shared expert"), ("word_embeddings", "embedding"),
                         ("position_embeddings", "position embedding"), ("output_layer", "output layer"),
                         ("attention.qkv", "attention qkv"), ("attention.proj", "attention proj"),
                         ("mlp.fc1", "mlp fc1"), ("mlp.fc2", "mlp fc2"), ("norm", "norms")):
        if needle in key:
            return name
    return "other"


@dataclasses.dataclass
class Report:
    rows: list[tuple]  # (what, step or family, reference, layout, difference, tolerance, ok)
    passed: bool

    def table(self) -> str:
        head = f"{'':12} {'step':>14} {'reference':>14} {'layout':>14} {'difference':>11} {'tolerance':>10}"
        lines = [head, "-" * len(head)]
        for what, where, ref, got, diff, tol, ok in self.rows:
            lines.append(f"{what:12} {str(where):>14} {_num(ref):>14} {_num(got):>14} {diff:11.3g} {tol:10.3g}"
                         + ("" if ok else "  <-- FAIL"))
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.7g}"


def compare(ref_save: str, layout_save: str, precision: str, lr: float, steps: int) -> Report:
    tol = TOLERANCES[precision]
    ref, got = step_rows(ref_save), step_rows(layout_save)
    rows = []
    for it in sorted(ref):
        for key in ("loss", "grad_norm", "lr"):
            a, b = ref[it].get(key), got.get(it, {}).get(key)
            if a is None and b is None:
                continue
            diff = math.inf if a is None or b is None else abs(a - b) / max(abs(a), 1e-12)
            rows.append((key, it, a, b, diff, tol[key], diff <= tol[key]))
    ref_sd = load_full_state_dict(ref_save).state_dict
    got_sd = load_full_state_dict(layout_save).state_dict
    limit = tol["weights"] * lr * steps
    worst: dict[str, float] = {}
    for key, value in ref_sd.items():
        other = got_sd.get(key)
        diff = math.inf if other is None or other.shape != value.shape else (other - value).abs().max().item()
        worst[family(key)] = max(worst.get(family(key), 0.0), diff)
    for name, diff in sorted(worst.items()):
        rows.append(("weights", name, None, None, diff, limit, diff <= limit))
    missing = sorted(set(got_sd) - set(ref_sd))
    for key in missing:
        rows.append(("weights", key, None, None, math.inf, limit, False))
    return Report(rows, all(r[-1] for r in rows) and len(got) == len(ref) == steps)


# ---- the check -------------------------------------------------------------------------------------------------
def check(argv: list[str], *, max_ranks: int, steps: int, workdir: str, timeout: float = 900.0,
          echo=print) -> bool:
    """Plan, run the reference and the layout, compare; True when the layout passes."""
    plan = make_plan(argv, world_size=None, max_ranks=max_ranks, steps=steps)
    echo(f"checking {plan.axes.text()} against 1 rank, {steps} steps, {plan.precision} tolerances")
    for note in plan.notes:
        echo(f"  shrunk: {note}")
    init = os.path.join(workdir, "init")
    write_init(plan, init)
    try:
        started = time.monotonic()
        reference = run_world(plan.reference, 1, workdir, "reference", init, timeout)
        echo(f"  reference: 1 rank, {time.monotonic() - started:.0f} s")
        started = time.monotonic()
        layout = run_world(plan.layout, plan.axes.world, workdir, "layout", init, timeout)
        echo(f"  layout: {plan.axes.world} ranks, {time.monotonic() - started:.0f} s")
    except RunFailed as e:
        echo(f"FAIL: {e}")
        return False
    report = compare(reference, layout, plan.precision, plan.layout["optimizer"]["lr"], steps)
    echo(report.table())
    echo(f"{'PASS' if report.passed else 'FAIL'}: {plan.axes.text()} "
         f"{'matches' if report.passed else 'does not match'} the single-rank reference within the {plan.precision} "
         "tolerances (megaclm/training/layout_check.py)")
    return report.passed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="check_layout.py", description="Prove a parallel layout on a shrunk model against a single-rank "
        "reference, before the big run. Every argument it does not know is the run's own: the flags (or "
        "--config) of pretrain_gpt.py, with --world-size the run's world size.",
        epilog='e.g. LAUNCHER="python tools/check_layout.py --world-size 8" bash examples/pretrain_llama_7b.sh')
    parser.add_argument("--check-max-ranks", type=int,
                        default=torch.cuda.device_count() if torch.cuda.device_count() >= 2 else 8,
                        help="Processes the check may start (default: the local GPUs, else 8 CPU processes); "
                             "axes are scaled down to fit, each change printed.")
    parser.add_argument("--check-steps", type=int, default=3, help="Optimizer steps compared (default 3).")
    parser.add_argument("--check-dir", help="Keep the runs (configs, logs, checkpoints) here; default: a temporary "
                                            "directory, removed afterwards.")
    ours, run_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    script = next((i for i, a in enumerate(run_args) if a.endswith("pretrain_gpt.py")), None)
    if script is not None:  # LAUNCHER="python tools/check_layout.py ..." bash examples/*.sh
        del run_args[script]
    if ours.check_steps < 2 or ours.check_max_ranks < 1:
        raise UserError("--check-steps must be >= 2 (the loss after the first update shows its direction) and "
                        "--check-max-ranks >= 1")
    if ours.check_dir is not None:
        os.makedirs(ours.check_dir, exist_ok=True)
        if os.listdir(ours.check_dir):
            raise UserError(f"--check-dir {ours.check_dir} is not empty; give a new or empty directory")
        return 0 if check(run_args, max_ranks=ours.check_max_ranks, steps=ours.check_steps,
                          workdir=ours.check_dir) else 1
    with tempfile.TemporaryDirectory(prefix="megaclm-check-") as workdir:
        return 0 if check(run_args, max_ranks=ours.check_max_ranks, steps=ours.check_steps, workdir=workdir) else 1
