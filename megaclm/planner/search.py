"""Every layout megaclm accepts for a model on N GPUs, the ones that fit, ranked by predicted step time.

A candidate is accepted when megaclm's own start-up checks pass for it: the config sections' __post_init__,
config.derived.compute_derived (world size, batch and sequence divisibility) and config.validate (model vs
parallel shapes, pipeline vs ZeRO, MoE vs ZeRO-3, ...), exactly what pretrain_gpt.py runs before any process
group exists. It fits when megaclm.model.flops.estimate_memory is within the GPU's memory less `margin`.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from dataclasses import dataclass, field

from megaclm.config import MegaclmConfig, compute_derived
from megaclm.config.data import DataConfig
from megaclm.config.deepspeed_json import overlap_comm_runs
from megaclm.config.kernels import KernelsConfig
from megaclm.config.parallel import ParallelConfig
from megaclm.config.precision import PrecisionConfig
from megaclm.config.training import TrainingConfig
from megaclm.config.validate import check_vocab, validate
from megaclm.config.zero import ZeroConfig
from megaclm.planner.cost import RECOMPUTE, Layout, Prediction, Workload, memory_gib, predict
from megaclm.planner.hardware import HardwareProfile
from megaclm.utils.errors import UserError

SECTIONS = {"model", "parallel", "kernels", "training", "precision", "zero", "data"}


MEMORY_MARGIN = 0.1  # of the GPU's memory kept free by default (the CUDA context, ZeRO-3 prefetch, fragmentation)


def memory_budget_gib(hw: HardwareProfile, margin: float = MEMORY_MARGIN) -> float:
    """What a layout's estimate may reach on `hw` with `margin` of its memory kept free."""
    return hw.hbm_gib * (1 - margin)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass(frozen=True)
class SearchSpace:
    """What may vary; None = every value megaclm accepts (bounded as each field says)."""

    tp: tuple[int, ...] | None = None  # default: divisors of the world up to the GPUs per node
    pp: tuple[int, ...] | None = None
    seq: tuple[int, ...] | None = None  # sequence splits; default: divisors up to the GPUs per node
    split_kinds: tuple[str, ...] = ("ulysses", "ring")
    ep: tuple[int, ...] | None = None
    zero: tuple[int, ...] = (0, 1, 2, 3)
    offload: bool = False  # also try optimizer (and ZeRO-3 parameter) offload
    recompute: tuple[str, ...] = RECOMPUTE
    micro_batch: tuple[int, ...] | None = None  # default: powers of two up to 16 dividing the per-rank batch
    sp: tuple[bool, ...] = (True, False)  # with tp > 1
    overlap_grad: tuple[bool, ...] = (False, True)  # --overlap-grad-reduce, where it takes effect

    def __post_init__(self):
        bad = [r for r in self.recompute if r not in RECOMPUTE]
        if bad:
            raise UserError(f"--recompute {','.join(bad)}: choose from {', '.join(RECOMPUTE)}")
        if any(z not in (0, 1, 2, 3) for z in self.zero):
            raise UserError(f"--zero-stages {self.zero}: ZeRO stages are 0, 1, 2, 3")
        for name in ("tp", "pp", "seq", "ep", "micro_batch"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise UserError(f"search space {name}={values}: give sizes >= 1")


def layouts(world: int, work: Workload, space: SearchSpace):
    """Every combination of the space's axes whose sizes multiply to `world` (not yet validated)."""
    G, model = work.gpus_per_node, work.model
    for tp in space.tp or [k for k in divisors(world) if k <= G]:
        if world % tp:
            continue
        for seq in space.seq or [k for k in divisors(world // tp) if tp * k <= G]:
            if (world // tp) % seq:
                continue
            kinds = [False] if seq == 1 else [k == "ring" for k in space.split_kinds]
            for pp in space.pp or [k for k in divisors(world // (tp * seq)) if k <= model.num_layers]:
                if (world // (tp * seq)) % pp:
                    continue
                dp = world // (tp * seq * pp)
                per_rank = work.global_batch // dp if work.global_batch % dp == 0 else 0
                # A batch that does not divide is left to megaclm's own check (compute_derived) to refuse.
                mbs = space.micro_batch or [k for k in (1, 2, 4, 8, 16) if per_rank and per_rank % k == 0] or [1]
                eps = [1] if model.num_experts is None else (
                    space.ep or [k for k in divisors(model.num_experts) if (dp * seq) % k == 0])
                sps = [False] if tp == 1 else space.sp
                for ring, ep, sp, zero, rc, mb in itertools.product(kinds, eps, sps, space.zero, space.recompute, mbs):
                    offloads = [(False, False)]
                    if space.offload and zero > 0:
                        offloads.append((True, False))
                        if zero == 3:
                            offloads.append((True, True))
                    # overlap_comm: ZeRO-1/2 with a gradient reduction to hide, outside DeepSpeed's pipeline
                    overlaps = space.overlap_grad if overlap_comm_runs(zero, pp) and dp * seq > 1 else (False,)
                    for (opt, param), overlap in itertools.product(offloads, overlaps):
                        yield Layout(tp=tp, pp=pp, dp=dp, seq=seq, ring=ring, ep=ep, sp=sp, zero=zero,
                                     offload_optimizer=opt, offload_param=param, overlap_grad=overlap,
                                     recompute=rc, micro_batch=mb)


def run_config(layout: Layout, work: Workload, kernels: KernelsConfig) -> MegaclmConfig:
    """The config sections pretrain_gpt.py would build for this layout (data mocked, one iteration)."""
    parallel = ParallelConfig(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp, sequence_parallel=layout.sp,
        expert_model_parallel_size=layout.ep, ds_sequence_parallel_size=1 if layout.ring else layout.seq,
        context_parallel_size=layout.seq if layout.ring else 1)
    training = TrainingConfig(micro_batch_size=layout.micro_batch, global_batch_size=work.global_batch, train_iters=1)
    zero = ZeroConfig(zero_stage=layout.zero, offload_optimizer=layout.offload_optimizer,
                      offload_param=layout.offload_param, overlap_grad_reduce=layout.overlap_grad)
    precision = PrecisionConfig(bf16=work.precision == "bf16", fp16=work.precision == "fp16")
    return MegaclmConfig(model=layout.model(work.model), parallel=parallel, kernels=kernels, training=training,
                         precision=precision, zero=zero, data=DataConfig(seq_length=work.seq_length, mock_data=True))


def refusal(layout: Layout, work: Workload, kernels: KernelsConfig) -> str | None:
    """megaclm's start-up error for this layout, or None when it would run."""
    try:
        cfg = run_config(layout, work, kernels)
        derived = compute_derived(cfg, layout.world)
        validate(cfg, derived, sections=SECTIONS)
        check_vocab(work.padded_vocab, work.padded_vocab, "the workload", layout.tp)  # its TP shards
    except UserError as e:
        return str(e)
    return None


@dataclass
class SearchResult:
    ranked: list[Prediction] = field(default_factory=list)  # fitting layouts, fastest first
    considered: int = 0
    refused: Counter = field(default_factory=Counter)  # megaclm's error -> layouts it refused
    too_big: int = 0
    smallest_gib: float | None = None  # the least memory of a refused-for-size layout


def search(world: int, work: Workload, hw: HardwareProfile, space: SearchSpace, kernels: KernelsConfig,
           margin: float = MEMORY_MARGIN, padded_vocab_for=None) -> SearchResult:
    """Rank every accepted layout of `world` GPUs that fits `hw` with `margin` of its memory kept free.

    `padded_vocab_for(tp)` gives the padded vocabulary at a tensor-parallel size (it grows with tp)."""
    if not 0 <= margin < 1:
        raise UserError(f"--memory-margin {margin}: give a fraction in [0, 1), e.g. 0.1")
    result = SearchResult()
    budget = memory_budget_gib(hw, margin)
    for layout in layouts(world, work, space):
        result.considered += 1
        w = work if padded_vocab_for is None else dataclasses.replace(work, padded_vocab=padded_vocab_for(layout.tp))
        why = refusal(layout, w, kernels)
        if why is not None:
            result.refused[why] += 1
            continue
        try:
            mem = memory_gib(layout, w)
        except UserError as e:
            result.refused[str(e)] += 1
            continue
        if mem > budget:
            result.too_big += 1
            result.smallest_gib = mem if result.smallest_gib is None else min(result.smallest_gib, mem)
            continue
        result.ranked.append(predict(layout, w, hw, memory=mem))
    result.ranked.sort(key=lambda p: p.step_s)
    return result


def shape_rank(ranked: list[Prediction], tp: int, pp: int, dp: int) -> int | None:
    """1-based rank of the best layout with these tp/pp/dp among the distinct (tp, pp, dp) shapes, or None."""
    seen = []
    for p in ranked:
        key = (p.layout.tp, p.layout.pp, p.layout.dp)
        if key not in seen:
            seen.append(key)
    return seen.index((tp, pp, dp)) + 1 if (tp, pp, dp) in seen else None
