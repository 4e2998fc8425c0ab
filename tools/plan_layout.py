#!/usr/bin/env python
"""Which parallel layout for my model on my cluster: every TP/PP/DP/sequence-split/EP/ZeRO/offload/recompute/
micro-batch choice megaclm accepts, ranked by predicted step time among those that fit in memory.

    python tools/plan_layout.py --model-preset llama-7b --gpus 64 --gpus-per-node 8 --gpu h100-80gb \\
        --seq-length 4096 --global-batch-size 512 [--top 5] [--out runs/plan] [--check]

The model comes from --model-preset and/or the model flags of pretrain_gpt.py (or --config YAML); --gpu is a
shipped hardware profile (a100-80gb, h100-80gb, h200-141gb) or a profile JSON (bench/profile_hardware.py).
Prints the top N with memory per GPU, step time, tokens/s per GPU, MFU and the bottleneck of each; writes the
winner's pretrain_gpt.py flags (winner.args), a launch script (launch.sh) and every ranked layout (plan.json) to
--out; --check runs tools/check_layout.py on the winner (a shrunk copy against one rank). The cost model,
its overlap rules and its validation: megaclm/planner/cost.py and the README's "Choosing a layout".
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaclm.config import parse_args  # noqa: E402
from megaclm.config.arguments import flag_names, negation  # noqa: E402
from megaclm.config.derived import pad_vocab_size  # noqa: E402
from megaclm.config.kernels import KernelsConfig  # noqa: E402
from megaclm.config.model import ModelConfig  # noqa: E402
from megaclm.config.presets import MODEL_PRESETS, PRESET_VOCAB_SIZE  # noqa: E402
from megaclm.model.flops import count_parameters  # noqa: E402
from megaclm.planner.cost import RECOMPUTE, Layout, Prediction, Workload  # noqa: E402
from megaclm.planner.hardware import load_profile  # noqa: E402
from megaclm.planner.search import MEMORY_MARGIN, SearchSpace, memory_budget_gib, search  # noqa: E402
from megaclm.utils import exitcodes  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402
from megaclm.utils.fileio import atomic_write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_VOCAB_SIZE = 50257


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated whole numbers, e.g. 1,2,4") from None
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("plan")
    g.add_argument("--gpus", type=int, required=True, help="GPUs of the job.")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8).")
    g.add_argument("--gpu", default="h100-80gb",
                   help="Hardware profile: a100-80gb, h100-80gb, h200-141gb, or a profile .json (default h100-80gb).")
    g.add_argument("--seq-length", type=int, default=2048, help="Tokens per sample.")
    g.add_argument("--global-batch-size", type=int, required=True, help="Samples per optimizer step.")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Tokenizer vocabulary before padding. Default: the preset's, else GPT-2's 50257.")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="Training precision.")
    g.add_argument("--top", type=int, default=5, help="Layouts to print (default 5).")
    g.add_argument("--memory-margin", type=float, default=MEMORY_MARGIN,
                   help="Fraction of GPU memory kept free beyond the estimate (CUDA context, ZeRO-3 prefetch, "
                        f"fragmentation; default {MEMORY_MARGIN}).")
    g.add_argument("--out", default="runs/plan", help="Where winner.args, launch.sh and plan.json go.")
    g.add_argument("--check", action="store_true", help="Run tools/check_layout.py on the winner.")
    g.add_argument("--check-max-ranks", type=int, default=None, help="Passed to tools/check_layout.py.")
    s = parser.add_argument_group("search space (default: everything megaclm accepts)")
    s.add_argument("--tp-sizes", type=int_list, default=None, help="Tensor-parallel sizes to try, e.g. 1,2,4,8.")
    s.add_argument("--pp-sizes", type=int_list, default=None, help="Pipeline sizes to try.")
    s.add_argument("--seq-splits", type=int_list, default=None,
                   help="Sequence splits (Ulysses or ring) to try; 1 for none.")
    s.add_argument("--split-kinds", default="ulysses,ring", help="Sequence split kinds: ulysses, ring or both.")
    s.add_argument("--ep-sizes", type=int_list, default=None, help="Expert-parallel sizes to try (MoE).")
    s.add_argument("--zero-stages", type=int_list, default=(0, 1, 2, 3), help="ZeRO stages to try.")
    s.add_argument("--recompute", default=",".join(RECOMPUTE), help=f"Recompute options: {', '.join(RECOMPUTE)}.")
    s.add_argument("--micro-batch-sizes", type=int_list, default=None,
                   help="Micro-batch sizes to try (default: 1, 2, 4, 8, 16 where they divide the batch).")
    s.add_argument("--offload", action="store_true", help="Also try CPU offload of the optimizer (and parameters).")


def section_flags(section, base) -> list[str]:
    """pretrain_gpt.py flags that turn `base` (a config section) into `section`."""
    out = []
    for f in dataclasses.fields(section):
        value, default = getattr(section, f.name), getattr(base, f.name)
        if value == default or f.metadata.get("cli", True) is False:
            continue
        flag = flag_names(f)[0]
        if isinstance(value, bool):
            on = not f.metadata.get("invert", False)
            out.append(flag if value == on else negation(flag))
        elif value is None:
            raise UserError(f"model.{f.name} is unset here but {default!r} in the preset: no flag unsets it; "
                            "give the model without --model-preset")
        else:
            out += [flag, str(value)]
    return out


def winner_flags(layout: Layout, model: ModelConfig, preset: str | None, kernels, base_kernels, seq: int,
                 global_batch: int, precision: str) -> list[str]:
    base = ModelConfig(**MODEL_PRESETS[preset]) if preset else ModelConfig()
    flags = (["--model-preset", preset] if preset else []) + section_flags(layout.model(model), base)
    flags += section_flags(kernels, base_kernels)
    flags += ["--tensor-model-parallel-size", str(layout.tp), "--pipeline-model-parallel-size", str(layout.pp)]
    if layout.sp:
        flags.append("--sequence-parallel")
    if layout.seq > 1:
        flags += ["--context-parallel-size" if layout.ring else "--ds-sequence-parallel-size", str(layout.seq)]
    if layout.ep > 1:
        flags += ["--expert-model-parallel-size", str(layout.ep)]
    flags += ["--zero-stage", str(layout.zero)]
    flags += ["--offload-optimizer"] * layout.offload_optimizer + ["--offload-param"] * layout.offload_param
    flags += ["--overlap-grad-reduce"] * layout.overlap_grad
    flags += ["--micro-batch-size", str(layout.micro_batch), "--global-batch-size", str(global_batch),
              "--seq-length", str(seq)]
    if precision != "fp32":
        flags.append(f"--{precision}")
    return flags


LAUNCH = """#!/usr/bin/env bash
# Written by tools/plan_layout.py: {summary}
# Predicted: {memory:.1f} GiB per GPU, {step:.3f} s per step, {tps:,.0f} tokens/s per GPU, MFU {mfu:.1%}.
#
#   DATA=data/my_text_document NUM_NODES={nodes} bash {name} --tokenizer-type ... --train-iters ... [more flags]
#
# Add your data, tokenizer, run length, lr schedule and checkpoint flags; the layout flags are the planner's.
set -euo pipefail
cd {root}
NUM_NODES=${{NUM_NODES:-{nodes}}}
GPUS_PER_NODE=${{GPUS_PER_NODE:-{per_node}}}
MASTER_PORT=${{MASTER_PORT:-29500}}
DATA=${{DATA:-data/my_text_document}}
HOSTFILE=${{HOSTFILE:-hostfile}}
if [ "$NUM_NODES" -gt 1 ]; then
    LAUNCHER=${{LAUNCHER:-deepspeed --hostfile $HOSTFILE --num_nodes $NUM_NODES --num_gpus $GPUS_PER_NODE --master_port $MASTER_PORT}}
else
    LAUNCHER=${{LAUNCHER:-deepspeed --num_gpus $GPUS_PER_NODE --master_port $MASTER_PORT}}
fi

$LAUNCHER pretrain_gpt.py \\
    {flags} \\
    --data-path "$DATA" \\
    "$@"
"""


def write_outputs(out: str, best: Prediction, flags: list[str], ranked: list[Prediction], meta: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with atomic_write(os.path.join(out, "winner.args"), "w") as f:
        f.write(shlex.join(flags) + "\n")
    gpus, per_node = meta["gpus"], meta["gpus_per_node"]
    script = LAUNCH.format(summary=meta["summary"], memory=best.memory_gib, step=best.step_s,
                           tps=best.tokens_per_s_per_gpu, mfu=best.mfu, nodes=max(1, gpus // per_node),
                           per_node=min(gpus, per_node), root=shlex.quote(ROOT),
                           name=os.path.join(out, "launch.sh"), flags=" \\\n    ".join(
                               " ".join(shlex.quote(x) for x in pair) for pair in _pairs(flags)))
    path = os.path.join(out, "launch.sh")
    with atomic_write(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    with atomic_write(os.path.join(out, "plan.json"), "w") as f:
        json.dump({**meta, "ranked": [{"layout": dataclasses.asdict(p.layout), "text": p.layout.text(),
                                       "memory_gib": p.memory_gib, "step_s": p.step_s,
                                       "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu, "mfu": p.mfu,
                                       "bottleneck": p.bottleneck, "breakdown_s": p.breakdown} for p in ranked]},
                  f, indent=1)


def _pairs(flags: list[str]):
    """Flags grouped with their values, one group per line of the script."""
    group = []
    for x in flags:
        if x.startswith("--") and group:
            yield group
            group = []
        group.append(x)
    if group:
        yield group


def bottleneck_text(p: Prediction) -> str:
    parts = sorted(p.breakdown.items(), key=lambda kv: -kv[1])
    first = f"{parts[0][0]} {parts[0][1] / p.step_s:.0%}"
    rest = [kv for kv in parts[1:] if kv[0] not in ("matmul", "attention")]
    return first + (f" (then {rest[0][0]} {rest[0][1] / p.step_s:.0%})" if rest and rest[0][1] > 0 else "")


def main(argv=None) -> int:
    cfg, _, args = parse_args(argv, sections=("model", "kernels"), add_arguments=add_arguments,
                              prog="plan_layout.py", description=__doc__.split("\n\n")[0])
    for name in ("gpus", "gpus_per_node", "global_batch_size", "seq_length", "top"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    model = cfg.model
    hw = load_profile(args.gpu)
    hw.peak_flops(args.precision)
    vocab = args.vocab_size or PRESET_VOCAB_SIZE.get(args.model_preset, GPT2_VOCAB_SIZE)
    if vocab < 1:
        raise UserError(f"--vocab-size {vocab} must be >= 1")
    space = SearchSpace(tp=args.tp_sizes, pp=args.pp_sizes, seq=args.seq_splits,
                        split_kinds=tuple(args.split_kinds.split(",")), ep=args.ep_sizes, zero=args.zero_stages,
                        offload=args.offload, recompute=tuple(args.recompute.split(",")),
                        micro_batch=args.micro_batch_sizes)
    if not set(space.split_kinds) <= {"ulysses", "ring"}:
        raise UserError(f"--split-kinds {args.split_kinds}: choose ulysses, ring or both (comma-separated)")
    padded = lambda tp: pad_vocab_size(vocab, model.make_vocab_size_divisible_by, tp)  # noqa: E731
    work = Workload(model=model, padded_vocab=padded(1), seq_length=args.seq_length,
                    global_batch=args.global_batch_size, gpus_per_node=args.gpus_per_node, precision=args.precision,
                    flash_attention=cfg.kernels.attention_backend in ("sdpa", "flash"))
    result = search(args.gpus, work, hw, space, cfg.kernels, margin=args.memory_margin, padded_vocab_for=padded)
    budget = memory_budget_gib(hw, args.memory_margin)
    refused = sum(result.refused.values())
    if not result.ranked:
        if result.too_big:
            raise UserError(f"no layout of {args.gpus} GPUs fits in {budget:.1f} GiB ({hw.name}, "
                            f"{args.memory_margin:.0%} kept free): the smallest needs {result.smallest_gib:.1f} GiB; "
                            "add GPUs, shorten --seq-length, allow --offload or widen the search space")
        reason = result.refused.most_common(1)[0][0] if result.refused else "the search space is empty"
        raise UserError(f"megaclm accepts no layout of {args.gpus} GPUs for this model and batch; e.g.: {reason}")
    n = count_parameters(model, padded(1)).total
    summary = (f"{args.model_preset or 'custom model'} ({n / 1e9:.2f}B parameters) on {args.gpus} x {hw.name} "
               f"({args.gpus_per_node} per node), seq {args.seq_length}, global batch {args.global_batch_size}, "
               f"{args.precision}")
    print(f"plan: {summary}")
    print(f"searched {result.considered} layouts: {refused} refused by megaclm's checks, {result.too_big} over "
          f"{budget:.1f} GiB ({hw.hbm_gib:g} GiB less {args.memory_margin:.0%}), {len(result.ranked)} fit")
    print(f"{'rank':>4}  {'layout':44s}{'GiB/GPU':>8}{'step s':>9}{'tok/s/GPU':>11}{'MFU':>7}  bottleneck")
    for i, p in enumerate(result.ranked[:args.top], 1):
        print(f"{i:4d}  {p.layout.text():44s}{p.memory_gib:8.1f}{p.step_s:9.3f}{p.tokens_per_s_per_gpu:11,.0f}"
              f"{p.mfu:7.1%}  {bottleneck_text(p)}")
    best = result.ranked[0]
    flags = winner_flags(best.layout, model, args.model_preset, cfg.kernels, KernelsConfig(), args.seq_length,
                         args.global_batch_size, args.precision)
    meta = {"summary": summary, "gpus": args.gpus, "gpus_per_node": args.gpus_per_node, "profile": hw.to_dict(),
            "memory_margin": args.memory_margin, "considered": result.considered, "refused": refused,
            "too_big": result.too_big}
    write_outputs(args.out, best, flags, result.ranked[:max(args.top, 1)], meta)
    print(f"winner: {best.layout.text()}; flags in {os.path.join(args.out, 'winner.args')}, launch script "
          f"{os.path.join(args.out, 'launch.sh')}")
    if not args.check:
        return 0
    cmd = [sys.executable, os.path.join(ROOT, "tools", "check_layout.py"), "--world-size", str(args.gpus)]
    if args.check_max_ranks is not None:
        cmd += ["--check-max-ranks", str(args.check_max_ranks)]
    cmd += flags + ["--train-iters", "3"]
    print("check: " + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc == exitcodes.BAD_INPUT:
        raise UserError("tools/check_layout.py refused the winner's flags (its error is above)")
    return exitcodes.FINISHED if rc == 0 else exitcodes.FAILED


if __name__ == "__main__":
    cli_main(main)
