#!/usr/bin/env python
"""The layout planner against measurements (validation 1) and against published runs (validation 2).

    python bench/profile_hardware.py --out runs/cpu_profile.json      # the CPU profile, 1 thread per rank
    python bench/plan_validation.py --profile runs/cpu_profile.json [--json F]
    python bench/plan_validation.py --published                       # validation 2, on paper (no processes)

Validation 1 (opt-in: timings on a shared CPU are noisy, so CI runs no timed part). A small Llama (4 layers,
hidden 256, GQA 8/4 heads, SwiGLU, sequence 512, fp32) trains on 2 gloo ranks, spawned once (forkserver),
in each LAYOUT through megaclm's own path (bench/efficiency.py's build_run: pretrain_gpt.py's flags,
init_distributed, build_model, build_engine, the trainer's train_step): warm-up steps, then --steps timed
steps (their median on rank 0, as the profile's rates are medians; the load average is printed beside the
table: on a shared host the others' work shows in every time). The planner (megaclm.planner.cost.predict)
predicts each step time with the measured profile; the two rankings must agree (Spearman >= 0.8). Memory: on every rank, the bytes of every live tensor
storage when the inner optimizer's step runs (weights, gradients, fp32 copies and Adam moments: what the
estimate calls model states) plus the activations autograd keeps for one micro-batch (bench/efficiency_probes
SavedActivations: layers, embedding and loss) times the micro-batches in flight (with full recomputation, + the
one layer recomputed at a time in backward, measured in the same layout without it); the fullest rank's total
against megaclm.model.flops.estimate_memory (reference_ops: what a CPU run executes) must agree within 10%.

Validation 2: every run of megaclm.planner.published, planned with its publication's recipe and GPU profile
(Narayanan et al. 2021 on a100-80gb: ZeRO-0, full recomputation, no sequence split or SP; the Megatron-LM README's
H100 table on h100-80gb: ZeRO-1, SP, --overlap-grad-reduce, recomputation searched): the published layout's rank
among the distinct (tp, pp, dp) shapes (target: top 3), and its predicted MFU against the published one (target:
within 25%; for the H100 table also the MFU with all TP and DP traffic hidden, an upper bound: Megatron hides more
of it than megaclm). Prints the README's tables.

With --published it also checks BigScience's measured sweep (megaclm.planner.published.BIGSCIENCE_SWEEP: 20 layouts
of a 181B GPT on 384 A100s under DeepSpeed's pipeline engine, 3 of them out of memory): the planner's tokens/s per
GPU against the measured ones (Spearman), as shipped and with op_overhead_us fitted for the sweep's blocking
launches, and the estimate's fit within plan_layout.py's default margin against what ran.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megaclm.planner.cost import Layout  # noqa: E402

GLOBAL_BATCH = 8
ZERO0 = ["--zero-stage", "0"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
PP2 = ["--pipeline-model-parallel-size", "2"] + ZERO0
# name -> (pretrain_gpt.py flags on top of the shape's, the planner's Layout); all on 2 ranks. Chosen to spread
# the predictions: recomputation (+1/3 compute), the bubble of 2 stages at 8, 4 and 2 micro-batches, TP/SP,
# Ulysses and ZeRO traffic over gloo (ZeRO-2's reduce-scatter in each of 4 backwards, and overlapped).
LAYOUTS = {
    "dp2-zero0": (ZERO0, Layout(dp=2, zero=0)),
    "dp2-zero1": (["--zero-stage", "1"], Layout(dp=2, zero=1)),
    "dp2-zero2": (["--zero-stage", "2"], Layout(dp=2, zero=2)),
    "dp2-zero2-overlap": (["--zero-stage", "2", "--overlap-grad-reduce"], Layout(dp=2, zero=2, overlap_grad=True)),
    "dp2-zero3": (["--zero-stage", "3", "--zero-param-persistence-threshold", "0"], Layout(dp=2, zero=3)),
    "dp2-recompute": (ZERO0 + RECOMPUTE, Layout(dp=2, zero=0, recompute="full")),
    "tp2": (["--tensor-model-parallel-size", "2"] + ZERO0, Layout(tp=2, zero=0)),
    "tp2-sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"] + ZERO0, Layout(tp=2, sp=True, zero=0)),
    "ulysses2": (["--ds-sequence-parallel-size", "2"] + ZERO0, Layout(seq=2, zero=0)),
    "pp2-mb1": (PP2, Layout(pp=2, zero=0)),
    "pp2-mb2": (PP2 + ["--micro-batch-size", "2"], Layout(pp=2, zero=0, micro_batch=2)),
    "pp2-mb4": (PP2 + ["--micro-batch-size", "4"], Layout(pp=2, zero=0, micro_batch=4)),
    "pp2-recompute": (PP2 + ["--micro-batch-size", "2"] + RECOMPUTE,
                      Layout(pp=2, zero=0, micro_batch=2, recompute="full")),
}


# Full recomputation keeps only each layer's input during the forward (what SavedActivations sees); backward then
# recomputes one layer at a time, whose activations are those of the same layout without recomputation.
RECOMPUTE_TWINS = {"dp2-recompute": "dp2-zero0", "pp2-recompute": "pp2-mb2"}


def shape_args(args) -> argparse.Namespace:
    return argparse.Namespace(layers=args.layers, hidden=args.hidden, ffn=args.ffn, seq=args.seq)


# ---------------------------------------------------------------------------------------------
# Validation 1: one layout on one rank


def live_bytes() -> int:
    """Bytes of every distinct tensor storage alive in Python right now (unreachable cycles collected first: a
    previous step's garbage is not memory the layout holds)."""
    gc.collect()
    seen, total = set(), 0
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.reduce_op's deprecation
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj):
                continue
            s = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - meta tensors, half-built objects
            continue
        if s.data_ptr() not in seen and s.nbytes() > 0:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def measure(rank: int, args, name: str) -> dict:
    import efficiency

    from efficiency_probes import SavedActivations

    flags, layout = LAYOUTS[name]
    # 3 untimed steps (warm-up, the optimizer-step sample, the saved-activation count), then the timed ones: the
    # mock dataset holds exactly that many batches.
    argv = efficiency.shape_argv(shape_args(args)) + flags + ["--global-batch-size", str(GLOBAL_BATCH),
                                                              "--train-iters", str(3 + args.steps)]
    before = live_bytes()  # what earlier layouts left behind in this process (DeepSpeed's caches, groups)
    run = efficiency.build_run(argv)
    run.step()  # warm-up: DeepSpeed's lazily built buffers, the optimizer's moments
    at_step = []
    adamw_step = torch.optim.AdamW.step

    def sampled(self, *a, **kw):  # the inner torch optimizer (torch_adam on the CPU): fp32 grads exist here
        at_step.append(live_bytes())
        return adamw_step(self, *a, **kw)

    torch.optim.AdamW.step = sampled
    try:
        run.step()
    finally:
        torch.optim.AdamW.step = adamw_step
    embedding, head, n_layers = efficiency._parts(run.engine)
    saved = SavedActivations(run.engine.module, embedding, head)
    with saved.installed():
        run.step()
    saved.close()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run.step()
        times.append(time.perf_counter() - t0)
    run.metrics.close()
    acc = run.derived.grad_accum_steps
    in_flight = min(run.pstate.pp_size - run.pstate.pp_rank, acc) if run.pstate.pp_size > 1 else 1
    act = sum(saved.calls[0].values())
    return {"layout": name, "rank": rank, "step_s": statistics.median(times), "fastest_s": min(times), "times": times,
            "states_bytes": (max(at_step) if at_step else live_bytes()) - before, "activation_bytes": act * in_flight,
            "layer_activation_bytes": saved.calls[0]["layers"] / n_layers}


# ---------------------------------------------------------------------------------------------
# Predictions


def cpu_workload(args):
    from megaclm.config.model import ModelConfig
    from megaclm.config.presets import MODEL_PRESETS
    from megaclm.planner.cost import Workload

    llama = {k: v for k, v in MODEL_PRESETS["llama-7b"].items() if k not in ("norm_epsilon",)}
    model = ModelConfig(**{**llama, "num_layers": args.layers, "hidden_size": args.hidden,
                           "ffn_hidden_size": args.ffn, "num_attention_heads": 8, "num_query_groups": 4,
                           "max_position_embeddings": args.seq, "untie_embeddings_and_output_weights": True})
    return Workload(model=model, padded_vocab=1024, seq_length=args.seq, global_batch=GLOBAL_BATCH, gpus_per_node=2,
                    precision="fp32", flash_attention=True, reference_ops=True)


def validation_1(args) -> dict:
    from megaclm.planner.cost import memory_gib, predict
    from megaclm.planner.hardware import load_profile
    from megaclm.planner.published import spearman

    hw = load_profile(args.profile)
    work = cpu_workload(args)
    names = list(LAYOUTS) if not args.layouts else args.layouts.split(",")
    twins = {name: RECOMPUTE_TWINS[name] for name in names if name in RECOMPUTE_TWINS}
    import efficiency

    load_before = os.getloadavg()
    measured = efficiency.run_layouts(args, names + sorted(set(twins.values()) - set(names)), measure_fn=measure)
    load = [round(max(a, b), 2) for a, b in zip(load_before, os.getloadavg())]
    rows = []
    for name in names:
        layout = LAYOUTS[name][1]
        pred = predict(layout, work, hw)
        ranks = measured[name]
        if name in twins:  # + the chunk recomputed in backward: one layer's activations, kept as without recompute
            for rank, r in ranks.items():
                r["activation_bytes"] += measured[twins[name]][rank]["layer_activation_bytes"]
        full = max(ranks.values(), key=lambda r: r["states_bytes"] + r["activation_bytes"])
        rows.append({"layout": name, "measured_s": ranks[0]["step_s"], "predicted_s": pred.step_s,
                     "bottleneck": pred.bottleneck, "measured_gib": (full["states_bytes"] + full["activation_bytes"])
                     / 2 ** 30, "predicted_gib": memory_gib(layout, work),
                     "measured_states_gib": full["states_bytes"] / 2 ** 30,
                     "measured_activations_gib": full["activation_bytes"] / 2 ** 30})
    rho = spearman([r["measured_s"] for r in rows], [r["predicted_s"] for r in rows])
    print(f"{'layout':18s}{'measured s':>11}{'predicted s':>12}{'meas. MiB':>10}{'pred. MiB':>10}{'ratio':>7}  "
          "bottleneck")
    for r in sorted(rows, key=lambda r: r["measured_s"]):
        r["memory_ratio"] = r["predicted_gib"] / r["measured_gib"]
        print(f"{r['layout']:18s}{r['measured_s']:11.3f}{r['predicted_s']:12.3f}{r['measured_gib'] * 1024:10.1f}"
              f"{r['predicted_gib'] * 1024:10.1f}{r['memory_ratio']:7.3f}  {r['bottleneck']}")
    worst = max(abs(r["memory_ratio"] - 1) for r in rows)
    print(f"Spearman rank correlation of step times: {rho:.3f} (target >= 0.8); memory: worst |predicted / measured "
          f"- 1| = {worst:.3f} (target <= 0.10); load average (1, 5, 15 min; the higher of before and after) {load}")
    return {"rows": rows, "spearman": rho, "worst_memory_error": worst, "load_average": load,
            "profile": hw.to_dict()}


def validation_2() -> dict:
    from megaclm.planner.published import PUBLISHED, hidden_comm_mfu, plan_published

    out = {}
    for published_set in PUBLISHED:
        rows = []
        bound = published_set.overlaps_comm
        print(f"\n{published_set.title} (profile {published_set.profile})\n")
        extra = " with TP and DP traffic hidden |" if bound else ""
        print("| run | GPUs | published tp x pp x dp | planner's best | published layout's rank | its step vs the "
              "best's | published MFU | predicted MFU | error |" + extra)
        print("|---|---|---|---|---|---|---|---|---|" + ("---|" if bound else ""))
        for run in published_set.runs:
            result, mine, rank = plan_published(published_set, run)
            best = result.ranked[0].layout
            err = mine.mfu / run.published_mfu - 1
            rows.append({"run": run.name, "rank": rank, "published_mfu": run.published_mfu, "predicted_mfu": mine.mfu,
                         "error": err, "best": [best.tp, best.pp, best.dp], "slower_than_best": mine.step_s /
                         result.ranked[0].step_s - 1, "hidden_comm_mfu": hidden_comm_mfu(mine)})
            print(f"| {run.name} | {run.gpus} | {run.tp} x {run.pp} x {run.dp} | {best.tp} x {best.pp} x {best.dp} | "
                  f"{rank} | {rows[-1]['slower_than_best']:+.1%} | {run.published_mfu:.1%} | {mine.mfu:.1%} | "
                  f"{err:+.0%} |" + (f" {rows[-1]['hidden_comm_mfu']:.1%} |" if bound else ""))
        out[published_set.title] = rows
    return {"sets": out}


def validation_sweep() -> dict:
    """BigScience's measured layout sweep (megaclm.planner.published.BIGSCIENCE_SWEEP) against the planner: with
    the profile as shipped (asynchronous launches), and with op_overhead_us fitted for the sweep's blocking ones."""
    import dataclasses

    from megaclm.planner.published import (BIGSCIENCE_SWEEP, fit_op_overhead, jean_zay_a100, plan_sweep_run,
                                           sweep_spearman)
    from megaclm.planner.search import memory_budget_gib

    hw = jean_zay_a100()
    blocking = dataclasses.replace(hw, op_overhead_us=fit_op_overhead(hw))
    budget = memory_budget_gib(hw)  # what plan_layout.py keeps by default
    rows = []
    for run in BIGSCIENCE_SWEEP:
        shipped, fitted = plan_sweep_run(run, hw), plan_sweep_run(run, blocking)
        rows.append({"layout": shipped.layout.text(), "global_batch": run.global_batch, "measured_s": run.seconds,
                     "measured_tokens_per_s_per_gpu": run.tokens_per_s_per_gpu,
                     "predicted_tokens_per_s_per_gpu": shipped.tokens_per_s_per_gpu,
                     "blocking_tokens_per_s_per_gpu": fitted.tokens_per_s_per_gpu,
                     "predicted_gib": shipped.memory_gib, "fits": shipped.memory_gib <= budget})
    result = {"rows": rows, "spearman": sweep_spearman(hw), "op_overhead_us": blocking.op_overhead_us,
              "blocking_spearman": sweep_spearman(blocking), "budget_gib": budget, "profile": hw.to_dict()}
    print(f"\nBigScience's sweep, 181B on {BIGSCIENCE_SWEEP[0].world} A100 80GB (profile {hw.name}; blocking launches: op_overhead_us "
          f"{blocking.op_overhead_us:.0f}, fitted)\n")
    print("| layout | global batch | measured s | measured tok/s/GPU | predicted tok/s/GPU | predicted / measured | "
          "with blocking launches | predicted GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -(r["measured_tokens_per_s_per_gpu"] or 0)):
        fit = "fits" if r["fits"] else f"over {budget:.0f}"
        if r["measured_s"]:
            m = r["measured_tokens_per_s_per_gpu"]
            print(f"| {r['layout']} | {r['global_batch']} | {r['measured_s']:.2f} | {m:.1f} | "
                  f"{r['predicted_tokens_per_s_per_gpu']:.1f} | {r['predicted_tokens_per_s_per_gpu'] / m:.2f} | "
                  f"{r['blocking_tokens_per_s_per_gpu'] / m:.2f} | {r['predicted_gib']:.1f} ({fit}) |")
        else:
            print(f"| {r['layout']} | {r['global_batch']} | out of memory | | | | | {r['predicted_gib']:.1f} ({fit}) |")
    print(f"\nSpearman rank correlation of tokens/s per GPU over the {sum(1 for r in rows if r['measured_s'])} that "
          f"ran: {result['spearman']:.3f} as shipped, {result['blocking_spearman']:.3f} with blocking launches")
    return result


def main(argv=None) -> int:
    from megaclm.utils.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published", action="store_true",
                        help="Validation 2 and BigScience's measured sweep only (on paper, seconds).")
    parser.add_argument("--profile", help="Validation 1: the CPU profile from bench/profile_hardware.py.")
    parser.add_argument("--layouts", default=None, help=f"Comma-separated subset of {', '.join(LAYOUTS)}.")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per layout (their median counts).")
    parser.add_argument("--threads", type=int, default=1, help="Threads per rank (as the profile was measured).")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", default=None, help="Also write every number here.")
    args = parser.parse_args(argv)
    if args.published:
        result = {**validation_2(), "bigscience_sweep": validation_sweep()}
    else:
        if not args.profile:
            raise UserError("pass --profile PROFILE.json (bench/profile_hardware.py writes it) or --published")
        if args.steps < 1:
            raise UserError(f"--steps {args.steps}: time at least 1 step per layout")
        unknown = set((args.layouts or "").split(",")) - set(LAYOUTS) - {""}
        if unknown:
            raise UserError(f"--layouts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(LAYOUTS)}")
        result = validation_1(args)
    if args.json:
        from megaclm.utils.fileio import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    from megaclm.utils.errors import cli_main

    cli_main(main)
