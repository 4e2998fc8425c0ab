"""Predicted memory and step time of one parallel layout (pure arithmetic; the model of the README's
"Choosing a layout" section).

Memory: megaclm.model.flops.estimate_memory, the estimate bench/efficiency.py measures (no second model).

Time of one optimizer step on the slowest pipeline stage, per micro-batch of b samples (s/n tokens on each of
the n ranks splitting a sequence; Ls layers on the stage, t = tp, e = bytes per activation element):
  compute     matmul FLOPs 6 * (active parameters of the stage's layers [+ the LM head on the last stage]) / t
              per token, over peak x achievable.matmul; attention 12 * Ls * a*d * s / t per token, over peak x
              achievable.attention; the memory-bound kernels' bytes (norms, dropout-residual adds, the MLP
              activation, a materialised softmax: ELEMENTWISE_H, ...) over HBM bandwidth x achievable.memory.
              Recompute adds a forward: full x 4/3 all three, selective x 4/3 attention.
  op overhead a fixed cost per operation (hw.op_overhead_us: a kernel launch on a GPU, an eager op's Python,
              dispatcher and autograd time on a CPU): OPS_PER_LAYER per layer forward, twice that backward, once
              more with full recomputation (selective: the attention core's ATTENTION_CORE_OPS), per micro-batch.
              It is what makes fewer, larger micro-batches faster (Narayanan et al. 2021 section 3.4: arithmetic
              intensity against the pipeline bubble).
  tensor      X = b*(s/n)*h*e. No SP: 4 all-reduces of X per layer (2 forward, 2 backward), 2(t-1)/t X each on
              the wire; SP: 10 all-gathers / reduce-scatters of X per layer ((t-1)/t X each: Megatron's count,
              with backward's re-gathers), the counts bench/efficiency.py audits. Full recomputation runs the
              forward's 2 (SP: 4) again in backward. The vocabulary-parallel ends add one call of X on the first
              stage (the embedding) and one (SP: two) on the last (the head's input), and the cross-entropy's 3
              all-reduces of b*s/n fp32 values. On the critical path.
  sequence    Ulysses: 8 all-to-alls per layer (q, k, v, out; forward and backward) of (2a+2g)*d*b*(s/n)*e/t in
              all per direction, (n-1)/n of it on the wire. Ring: all-gather K and V forward, reduce-scatter their
              gradients backward, each g*d*b*s*e/t, (n-1)/n on the wire. Full recomputation repeats the forward's.
              On the critical path.
  expert      MoE layers: 4 all-to-alls (dispatch, combine; forward, backward) of k*X, (ep-1)/ep on the wire (full
              recomputation: the forward's 2 again).
  pipeline    2 point-to-point transfers of X (/t with SP) per micro-batch between stages; the 1F1B schedule
              runs m + p - 1 micro-batch slots for m micro-batches: the bubble (p-1)/(m+p-1) of the step.
  data        G = 16-bit gradients of the stage's parameters (lp bytes each), over the seq x dp group D (experts
              over D/ep). ZeRO-0 all-reduces 2(D-1)/D G after the last backward; ZeRO-1 reduce-scatters
              (D-1)/D G after it and all-gathers the updated parameters (D-1)/D G; ZeRO-2 reduce-scatters in
              every micro-batch's backward, m (D-1)/D G, + the all-gather. With --overlap-grad-reduce (layout
              overlap_grad; DeepSpeed's overlap_comm, ZeRO-1/2 without a pipeline) each reduce-scatter runs
              bucket by bucket under its backward: what shows is the part longer than that backward plus, of
              the rest, the fraction the hardware cannot overlap (1 - hw.overlap: NCCL runs beside the GPU's
              kernels, gloo on a CPU takes the cores the compute needs); the all-gather still waits. ZeRO-3
              (overlap_comm always on) reduce-scatters every micro-batch under its backward and all-gathers the
              parameters forward and backward, 2(D-1)/D G, prefetched under its compute, exposed the same
              way. Its module hooks and bookkeeping cost hw.zero3_layer_us per layer and micro-batch
              (measured; 0 in the shipped GPU profiles).
  optimizer   Adam on the GPU streams ~36 bytes per local parameter through HBM; offloaded, CPU Adam
              (cpu_adam_gparams_per_s) plus fp32 gradients down and 16-bit parameters up over PCIe.
All-gathers, reduce-scatters and all-to-alls move at the link's gather_gbps where the profile gives one (gloo's
are slower than its all-reduce), the rest at its gbps; a profile with measured curves (link.sizes) times each
call by its size on them instead (gloo's mid-size messages are slower than bandwidth + latency say). Every
collective's bandwidth and latency are those of the link its group crosses: a group of `size` ranks at rank
`stride` stays in a node when stride x size <= GPUs per node (megaclm.parallel.state's rank order: tp fastest,
then the sequence split, then dp, then pp; expert groups are blocks of ep consecutive seq x dp ranks).
Not modelled: per-step Python overheads (DeepSpeed's engine step and ZeRO-1/2 bookkeeping),
GEMM efficiency by shape (one achievable fraction per class; smaller per-GPU GEMMs at higher TP are less
efficient), the ring's explicit-score blocks (counted at the attention rate), the interleaved schedule (DeepSpeed's
pipeline engine has none), load imbalance of MoE routing, stragglers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megaclm.config.model import ModelConfig
from megaclm.model.flops import MemorySetup, count_parameters, estimate_memory, flops_per_token, stage_parameters
from megaclm.planner.hardware import HardwareProfile, Link

GiB = 2 ** 30
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """One way to run: the parallel axes, ZeRO, recomputation and micro-batch size."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    seq: int = 1  # ranks splitting each sequence
    ring: bool = False  # the split is ring attention (--context-parallel-size), else Ulysses
    ep: int = 1
    sp: bool = False  # Megatron sequence parallelism (with tp > 1)
    zero: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_grad: bool = False  # --overlap-grad-reduce (ZeRO-1/2 without a pipeline: DeepSpeed overlap_comm)
    recompute: str = "none"
    micro_batch: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.seq

    def text(self) -> str:
        parts = [f"tp{self.tp}{'+sp' if self.sp else ''}", f"pp{self.pp}", f"dp{self.dp}"]
        if self.seq > 1:
            parts.append(f"{'cp' if self.ring else 'ulysses'}{self.seq}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        z = f"zero{self.zero}" + ("+offload" if self.offload_optimizer else "") + ("+param" if self.offload_param else "")
        z += "+overlap" if self.overlap_grad else ""
        return " ".join(parts + [z, f"rc-{self.recompute}", f"mb{self.micro_batch}"])

    def model(self, model: ModelConfig) -> ModelConfig:
        """The model section with this layout's recomputation."""
        granularity = None if self.recompute == "none" else self.recompute
        return dataclasses.replace(model, recompute_granularity=granularity, recompute_method="uniform",
                                   recompute_num_layers=1)


@dataclass(frozen=True)
class Workload:
    """What is trained, and on how many GPUs."""

    model: ModelConfig
    padded_vocab: int
    seq_length: int
    global_batch: int
    gpus_per_node: int
    precision: str = "bf16"
    flash_attention: bool = True
    reference_ops: bool = False  # the PyTorch reference ops' activations (a CPU run)


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory_gib: float  # per GPU, the fullest pipeline stage
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    breakdown: dict  # seconds per step by part (sums to step_s)

    @property
    def bottleneck(self) -> str:
        return max(self.breakdown, key=self.breakdown.get)


def memory_setup(layout: Layout, work: Workload) -> MemorySetup:
    return MemorySetup(
        seq_length=work.seq_length, micro_batch_size=layout.micro_batch, tensor_parallel=layout.tp,
        pipeline_parallel=layout.pp, data_parallel=layout.dp, zero_stage=layout.zero, precision=work.precision,
        sequence_parallel=layout.sp, grad_accum_steps=accumulation(layout, work),
        offload_optimizer=layout.offload_optimizer, offload_param=layout.offload_param,
        overlap_grad_reduce=layout.overlap_grad, flash_attention=work.flash_attention,
        reference_ops=work.reference_ops, seq_split=layout.seq, ring=layout.ring, expert_parallel=layout.ep)


def accumulation(layout: Layout, work: Workload) -> int:
    return work.global_batch // (layout.micro_batch * layout.dp)


def memory_gib(layout: Layout, work: Workload) -> float:
    return estimate_memory(layout.model(work.model), work.padded_vocab, memory_setup(layout, work)).gpu_total / GiB


def link_for(stride: int, size: int, gpus_per_node: int, hw: HardwareProfile) -> Link:
    """The link a group of `size` ranks `stride` apart crosses: every such group stays in a node only when its
    span (stride x size consecutive ranks) divides the GPUs per node (a tp of 6 on 8-GPU nodes straddles two)."""
    return hw.intra_node if size == 1 or gpus_per_node % (stride * size) == 0 else hw.inter_node


# Bytes the memory-bound kernels move per token and layer, in units of e (forward; backward moves twice
# that): on h-wide tensors 2 norms (read, write) and 2 dropout-residual adds (read 2, write, mask) = 12h,
# replicated on the TP ranks unless SP splits them; the MLP activation (read, write its f-wide input and
# output) = 2f (GeLU) or 3f (SwiGLU's gate and up), split by TP.
ELEMENTWISE_H, ELEMENTWISE_F = 12, {False: 2, True: 3}
# Materialised attention (no flash): scale-mask-softmax reads and writes the (a, s) scores of each token,
# [+ dropout's mask and output], forward; split by TP.
SOFTMAX_PASSES = 2
# ZeRO-3 gathers module by module: QKV, out-projection, fc1, fc2 and the two norms of a layer.
ZERO3_MODULES_PER_LAYER = 6
# Operations (kernels on a GPU) one layer's forward runs per micro-batch, as Megatron's fused GPT layer
# launches them: norm, QKV GEMM, Q/K/V relayout, QK^T, scale-mask-softmax, attention dropout, AV, context
# relayout, out-projection GEMM, its all-reduce, bias-dropout-add; norm, fc1 GEMM, bias-activation, fc2 GEMM,
# its all-reduce, bias-dropout-add. Backward runs about twice as many (two GEMMs per GEMM, a gradient per
# elementwise op); selective recomputation repeats the attention core's 5 (relayout to AV).
OPS_PER_LAYER, ATTENTION_CORE_OPS = 17, 5


def _layer_matmul_params(model: ModelConfig) -> float:
    """Parameters one token multiplies in one transformer layer (an MoE layer: its k routed experts)."""
    count = count_parameters(model, 1)
    return (count.non_embedding - count.final_norm - count.inactive) / model.num_layers


def exposed(comm_s: float, compute_s: float, overlap: float) -> float:
    """What of a collective shows when the fraction `overlap` of it can run under `compute_s` of compute."""
    return comm_s - overlap * min(comm_s, compute_s)


def predict(layout: Layout, work: Workload, hw: HardwareProfile, memory: float | None = None) -> Prediction:
    """Step time and throughput of `layout` (memory: pass it when already computed)."""
    m_cfg = work.model
    t, p, n, ep = layout.tp, layout.pp, layout.seq, layout.ep
    D = layout.dp * n  # ZeRO and the gradient reduction span seq x dp
    G = work.gpus_per_node
    e = 4 if work.precision == "fp32" else 2
    b, s, h, f = layout.micro_batch, work.seq_length, m_cfg.hidden_size, m_cfg.ffn_size
    a, g, d = m_cfg.num_attention_heads, m_cfg.num_kv_heads, m_cfg.head_dim
    m = accumulation(layout, work)
    tokens = b * s / n  # tokens of one micro-batch on one rank
    peak = hw.peak_flops(work.precision)
    stages = stage_parameters(m_cfg, work.padded_vocab, t, p, ep)
    per_layer = _layer_matmul_params(m_cfg)
    fwd_factor = {"none": 1.0, "selective": 1.0, "full": 4 / 3}[layout.recompute]
    attn_factor = {"none": 1.0, "selective": 4 / 3, "full": 4 / 3}[layout.recompute]
    fwd_passes = 2 if layout.recompute == "full" else 1  # full recomputation runs each forward (and its
    # collectives) again in backward

    X = tokens * h * e
    tp_link = link_for(1, t, G, hw)
    seq_link = link_for(t, n, G, hw)
    ep_link = link_for(t, ep, G, hw)
    dp_link = link_for(t * n, layout.dp, G, hw)
    pp_link = link_for(t * n * layout.dp, p, G, hw)

    def stage_parts(i: int, layers: int) -> dict:
        head = work.padded_vocab * h if i == p - 1 else 0
        mm = 6 * (per_layer * layers + head) / t * tokens
        attn = 12 * layers * a * d * s / t * tokens
        mm_s, attn_s = mm / (peak * hw.achievable["matmul"]), attn / (peak * hw.achievable["attention"])
        ew = (ELEMENTWISE_H * h / (t if layout.sp else 1) + ELEMENTWISE_F[m_cfg.swiglu] * f / t) * e
        if not work.flash_attention:
            ew += (SOFTMAX_PASSES + (3 if m_cfg.attention_dropout > 0 else 0)) * a * s * e / t
        ew_s = 3 * layers * ew * tokens / (hw.hbm_gbps * 1e9 * hw.achievable["memory"])
        parts = {"matmul": mm_s, "attention": attn_s, "memory-bound": ew_s,
                 "recompute": (mm_s + ew_s) * (fwd_factor - 1) + attn_s * (attn_factor - 1)}
        ops = OPS_PER_LAYER * layers * (2 + fwd_passes)
        if layout.recompute == "selective":
            ops += ATTENTION_CORE_OPS * layers
        parts["op overhead"] = ops * hw.op_overhead_us * 1e-6
        if t > 1:  # per layer, forward + backward: SP 4 + 6 calls of (t-1)/t X; else 2 + 2 all-reduces, 2(t-1)/t X
            fwd, bwd = (4, 6) if layout.sp else (2, 2)
            # + the vocabulary-parallel ends: the embedding's output reduced forward on the first stage, the head's
            # input gradient reduced backward on the last (SP: reduce-scatters, and the head's all-gather forward)
            calls = (fwd * fwd_passes + bwd) * layers + (i == 0) + (i == p - 1) * (2 if layout.sp else 1)
            wire = calls * (t - 1) / t * X * (1 if layout.sp else 2)
            parts["tensor comm"] = tp_link.seconds(wire, calls, gather=layout.sp)
            if i == p - 1:  # the cross-entropy's 3 all-reduces (max, sum of exponentials, target logit; fp32)
                parts["tensor comm"] += tp_link.seconds(3 * 2 * (t - 1) / t * tokens * 4, 3)
        if n > 1:
            if layout.ring:  # K and V all-gathered in each forward, their gradients reduce-scattered
                wire = 2 * (fwd_passes + 1) * layers * g * d * b * s * e / t * (n - 1) / n
                parts["sequence comm"] = seq_link.seconds(wire, 2 * (fwd_passes + 1) * layers, gather=True)
            else:  # 4 all-to-alls (q, k, v, out) in each forward, 4 in backward
                wire = (fwd_passes + 1) * layers * (2 * a + 2 * g) * d * tokens * e / t * (n - 1) / n
                parts["sequence comm"] = seq_link.seconds(wire, 4 * (fwd_passes + 1) * layers, gather=True)
        if ep > 1 and m_cfg.num_experts is not None:  # dispatch and combine in each forward and in backward
            moe_layers = sum(m_cfg.is_moe_layer(j) for j in range(layers)) if layers else 0
            wire = 2 * (fwd_passes + 1) * moe_layers * m_cfg.moe_router_topk * X * (ep - 1) / ep
            parts["expert comm"] = ep_link.seconds(wire, (2 * fwd_passes + 3) * moe_layers, gather=True)
        if p > 1:
            parts["pipeline p2p"] = pp_link.seconds(2 * X / (t if layout.sp else 1), 2)
        return parts

    per_stage = [stage_parts(i, st.layers) for i, st in enumerate(stages)]
    slowest = max(range(p), key=lambda i: sum(per_stage[i].values()))
    mb = per_stage[slowest]
    mb_s = sum(mb.values())
    compute_s = mb["matmul"] + mb["attention"] + mb["memory-bound"] + mb["recompute"]
    backward_s = compute_s * 2 / 3  # what a gradient reduction can hide under

    breakdown = {k: m * v for k, v in mb.items()}
    if p > 1:
        breakdown["pipeline bubble"] = (p - 1) * mb_s

    # Data-parallel traffic of the fullest stage's parameters (16-bit gradients and parameters).
    st = max(stages, key=lambda x: x.params)
    dense, experts = (st.params - st.experts) * e, st.experts * e
    groups = [(dense, D), (experts, D // ep)]

    def dp_seconds(all_reduce: bool = False, calls: int = 1) -> float:
        """One reduce-scatter (or all-reduce) of the stage's 16-bit gradients over their groups."""
        return sum(dp_link.seconds(nbytes * (2 if all_reduce else 1) * (size - 1) / size, calls,
                                   gather=not all_reduce) for nbytes, size in groups if nbytes and size > 1)

    z = layout.zero
    # ZeRO-1/2 with overlap_comm: what of a backward's reduce-scatter the compute beside it cannot hide
    reduce_s = exposed(dp_seconds(), backward_s, hw.overlap) if layout.overlap_grad else dp_seconds()
    if z == 0:  # DeepSpeed's engine all-reduces after the last backward (no overlap_comm without ZeRO)
        breakdown["data comm"] = dp_seconds(all_reduce=True)
    elif z == 1:  # reduce-scatter at the accumulation boundary (or under its backward), all-gather of the
        # updated parameters after the optimizer step
        breakdown["data comm"] = reduce_s + dp_seconds()
    elif z == 2:  # a reduce-scatter in every micro-batch's backward, the all-gather
        breakdown["data comm"] = m * reduce_s + dp_seconds()
    else:  # overlap_comm and prefetching: what the hardware cannot run under the compute beside it shows
        breakdown["data comm"] = m * exposed(dp_seconds(), backward_s, hw.overlap)
        modules = ZERO3_MODULES_PER_LAYER * stages[slowest].layers + 2  # each gathered on its own, twice
        breakdown["zero-3 gathers"] = m * exposed(2 * dp_seconds(calls=modules), compute_s, hw.overlap)
        breakdown["zero-3 hooks"] = m * stages[slowest].layers * hw.zero3_layer_us * 1e-6

    local = st.params / (D if z >= 1 else 1)  # parameters whose Adam update this GPU runs
    if layout.offload_optimizer:
        breakdown["optimizer"] = (local / (hw.cpu_adam_gparams_per_s * 1e9)
                                  + local * (4 + e) / (hw.pcie_gbps * 1e9))
    else:
        breakdown["optimizer"] = local * 36 / (hw.hbm_gbps * 1e9)
    if layout.offload_param:
        breakdown["param offload"] = 2 * m * st.params / D * e / (hw.pcie_gbps * 1e9)

    step = sum(breakdown.values())
    world = layout.world
    step_tokens = work.global_batch * s
    fpt = flops_per_token(m_cfg, work.padded_vocab, s)
    mem = memory_gib(layout, work) if memory is None else memory
    return Prediction(layout=layout, memory_gib=mem, step_s=step, tokens_per_s_per_gpu=step_tokens / step / world,
                      mfu=fpt * step_tokens / step / (world * peak), breakdown=breakdown)
