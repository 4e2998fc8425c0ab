"""Parameter count, FLOPs per token (for MFU) and a per-GPU memory estimate, from a ModelConfig.

Parameters (exact, Megatron's layer layout: fused QKV and fused gate/up projections)
    per layer   QKV  h*(a+2g)*d [+ (a+2g)*d bias]      out proj (a*d)*h [+ h]
                MLP  h*f*k [+ f*k] + f*h [+ h]          (k = 2 for SwiGLU's gate+up, else 1)
                two norms, h each [+ h bias for LayerNorm]
    model       word embeddings V*h (V = the padded vocabulary), learned positions P*h, final norm,
                and an output layer V*h only when untied.
    MoE layer   (every moe_layer_freq-th) the MLP is: router E*h, E experts of h*f_e*k + f_e*h each,
                a shared expert h*f_s*k + f_s*h [+ its gate h]. Active per token: router, shared
                expert and top-k of the E experts; `ParamCount.active` counts those.

FLOPs per token (PaLM appendix B; Narayanan et al. 2021 "Efficient Large-Scale Language Model
Training on GPU Clusters", eq. 3 without the recompute factor):
        6 * N  +  12 * L * (a*d) * T
    N is Megatron's count of *active* parameters (an MoE token runs k of the E experts): every parameter that takes part in a matmul, i.e. all parameters except
    the input-embedding lookup (word and position tables). The output layer's V*h always counts,
    so a tied model's N is its total minus the position table; an untied one also drops its input
    embedding. The second term is attention's QK^T and AV (2 matmuls * 2 FLOPs * T*a*d forward, x3 for
    forward+backward) at the full (not causally halved) sequence T. `mfu()` divides by the peak.

Memory per GPU (bytes), for DeepSpeed's ZeRO optimizers as they allocate in 0.19
(runtime/zero/stage_1_and_2.py, stage3.py, fp16/fused_optimizer.py). P = parameters on one GPU
(its pipeline stage, one tensor-parallel shard), N = data-parallel size, lp = 2 (bf16/fp16) or 4:
                        ZeRO-0            ZeRO-1        ZeRO-2        ZeRO-3
    weights             lp*P              lp*P          lp*P          lp*P/N
    gradients           lp*P              lp*P          lp*P/N        lp*P/N
    fp32 gradients      4P (mixed only)   4P/N          4P/N          4P/N   (made at the step)
    fp32 master         4P (mixed only)   4P/N          4P/N          4P/N
    Adam moments        8P                8P/N          8P/N          8P/N
    gathered layer      -                 -             -             2*lp*largest module
  ZeRO-2 with bf16 is 2P + 18P/N, exactly DeepSpeed's estimate_zero2_model_states_mem_needs. For
  ZeRO-3 DeepSpeed's estimator gives 4*largest + 18P/N: it leaves out the 16-bit parameter partition
  (2P/N) that its own offload branch counts, so this estimate is 2P/N above it (a real one-rank bf16
  engine holds 20.0 bytes per parameter at its step under ZeRO 0, 1, 2 and 3 alike; see
  tests/unit/test_flops.py). ZeRO-0 with bf16 is DeepSpeed's FP16_(Unfused)Optimizer; on the pipeline
  engine it is BF16_Optimizer, which shards the master weights and moments over data parallel, so
  there the ZeRO-0 figure is an upper bound. ZeRO-3 gathers one
  whole module (16-bit weights + gradients) at a time: "2*lp*largest module", DeepSpeed's term.
  CPU offload moves the fp32 gradients, master weights and moments to the CPU; ZeRO-2 then keeps no
  16-bit gradients on the GPU (they are copied out bucket by bucket), ZeRO-3 keeps its gradient
  partition in pinned CPU memory, and offload_param moves the 16-bit partition there too.

Activations per layer and micro batch (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", section 4), generalised to GQA, SwiGLU and any FFN size; e = bytes per
activation element, t = tensor-parallel size, masks take one byte:
    kept whole on each TP rank (split by t only with sequence parallelism):
        2 norm inputs + QKV input + MLP input: 4*s*b*h*e;  2 dropout masks: 2*s*b*h (if hidden_dropout)
    split by t:
        Q, K, V: s*b*(a+2g)*d*e;  attention output (out-proj input): s*b*a*d*e
        MLP: GeLU keeps its input and output, 2*s*b*f*e; SwiGLU keeps gate+up and their product, 3*s*b*f*e
        attention core: SDPA flash/cuDNN keeps only the fp32 log-sum-exp, 4*a*s*b; materialised scores
            keep softmax 2*a*s^2*b [+ mask a*s^2*b + dropout output 2*a*s^2*b with attention_dropout]
        RoPE: the rotated Q and K, s*b*(a+g)*d*e, beside the QKV output (V stays a view of it)
  These are the fused CUDA ops' and flash attention's saves, whatever host runs the estimate. The PyTorch
  reference ops (`reference_ops`, --estimate-for cpu: what a CPU run executes) keep more: each norm its
  input in fp32 and RMSNorm the normalised fp32 x, 2*s*b*h*(8-e) + 2*4*s*b (LayerNorm 2*s*b*h*(4-e)), and
  SwiGLU also silu(gate), s*b*f*e. bench/efficiency.py measures these per layout (within 10%).
  Routed experts (MoE): each GPU holds 1/ep of them (expert parallel), and ZeRO partitions their states
  over the dp/ep ranks holding the same experts, so they count P_e/ep above with N = dp/ep.
  MoE layers count as a dense MLP of f = k * (expert size) + (shared size): balanced, dropless routing,
  and every layer treated as MoE (an upper bound with moe_layer_freq > 1); plus the routed token copies
  the experts keep (their inputs and outputs, 2*k*s*b*h*e) and the router's fp32 probabilities (4*s*b*E).
  For GPT with dropout, materialised scores and e=2 this is the paper's s*b*h*(10 + 24/t + 5*a*s/(h*t)).
  The first stage also keeps the embedding dropout mask (s*b*h), the last the final norm's input and
  output (2*s*b*h*e) and what the cross-entropy saves: the fp32 logits (4*s*b*V/t), or with tp=1
  GPTModel's fused linear cross-entropy only the per-token log-sum-exp (4*s*b; the pipeline's loss always
  materialises the logits), and in a pipeline the logits DeepSpeed's engine keeps in each of the last stage's
  pipe buffers after their backward (max(2, in flight) x s*b*V/t*e). Full recomputation
  keeps only each chunk's input (s*b*h*e per `recompute_num_layers` layers, method uniform) or the
  inputs of the first `recompute_num_layers` layers of a stage with the others whole (method block),
  and recomputes one chunk at a time; selective recomputation drops the attention core's share.
  Under DeepSpeed's 1F1B pipeline schedule stage i holds min(pp - i, accumulation steps) micro batches.
  A sequence split over n ranks (Ulysses or ring, `seq_split`) gives each rank s/n tokens: every term
  above with s becomes s/n, and the attention core's s^2 becomes (s/n)*s (Ulysses: all s queries of a/n
  heads; ring: s/n queries against s keys, an upper bound, as the blocks wholly in the future are skipped);
  the ring also keeps the all-gathered keys/values of the whole sequence for backward, 2*s*b*g*d*e
  (minus its own share). The ring's core attention computes explicit-score blocks of c = s/2n tokens (not
  flash): each rank attends 2n+1 of them (the chunk pairs not wholly in the future) and keeps per block the
  fp32 scores and probabilities and its fp32 output with the online-softmax merge's copy, 8*a*b*c*(c + d).
  ZeRO shards over n x dp (DeepSpeed's sequence-data-parallel group).
ZeRO also allocates its gradient-reduction bucket whole, reduce_bucket_size (5e8) elements of the 16-bit
gradient dtype (953 MiB in bf16): ZeRO-3 up front, ZeRO-1/2 at the first backward (contiguous_gradients), two
of them with overlap_comm (--overlap-grad-reduce, double-buffered): counted as "reduce bucket". On a CPU
(reference_ops) ZeRO-1/2's are left out: untouched pages of a large host allocation are not resident, and only
the stage's gradients pass through them.
Not counted: ZeRO-3's prefetch buffers, the CUDA context (~0.5 GiB), kernels' workspaces and allocator
fragmentation - keep 10-20% headroom.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from megaclm.config.deepspeed_json import ZERO_REDUCE_BUCKET, overlap_comm_runs
from megaclm.config.model import ModelConfig
from megaclm.utils.errors import UserError

GiB = 2 ** 30
# Dense bf16 tensor-core peak of one H100 SXM, the MFU denominator of issue 9.
H100_BF16_PEAK_FLOPS = 989.4e12
PRECISIONS = ("bf16", "fp16", "fp32")
# What the activation estimate assumes, by MemorySetup.reference_ops (--estimate-for gpu / cpu).
KERNELS_ASSUMED = {False: "activations for the fused CUDA ops and flash attention (--estimate-for gpu)",
                   True: "activations for the PyTorch reference ops of a CPU run (--estimate-for cpu)"}


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParamCount:
    """Exact parameter counts of a GPTModel (unsharded); `vocab_size` is the padded vocabulary."""

    word_embeddings: int
    position_embeddings: int
    layer: int  # one transformer layer
    num_layers: int
    final_norm: int
    output_layer: int  # the untied LM head; 0 when tied to the word embeddings
    num_moe_layers: int = 0
    moe_layer: int = 0  # one MoE layer, all experts
    expert: int = 0  # one routed expert
    num_experts: int = 0
    topk: int = 0

    @property
    def layers(self) -> int:
        return self.layer * (self.num_layers - self.num_moe_layers) + self.moe_layer * self.num_moe_layers

    @property
    def experts(self) -> int:
        """Routed-expert parameters of all MoE layers (0 for a dense model)."""
        return self.expert * self.num_experts * self.num_moe_layers

    @property
    def inactive(self) -> int:
        """Routed-expert parameters a token does not use (E - k experts per MoE layer)."""
        return self.expert * (self.num_experts - self.topk) * self.num_moe_layers

    @property
    def total(self) -> int:
        return (self.word_embeddings + self.position_embeddings + self.layers + self.final_norm
                + self.output_layer)

    @property
    def active(self) -> int:
        """Parameters one token uses: the total less the routed experts it is not sent to."""
        return self.total - self.inactive

    @property
    def non_embedding(self) -> int:
        """Transformer layers and final norm: no embedding table, no LM head."""
        return self.layers + self.final_norm

    @property
    def flops_params(self) -> int:
        """Megatron's N for 6N: every active parameter in a matmul, so the LM head (V*h) but no embedding lookup."""
        return self.non_embedding - self.inactive + self.word_embeddings


@dataclass(frozen=True)
class _LayerShapes:
    """One layer's parameters by module: (sharded over TP, replicated) element counts."""

    qkv: tuple[int, int]
    proj: tuple[int, int]
    fc1: tuple[int, int]
    fc2: tuple[int, int]
    norms: tuple[int, int]
    experts: tuple[int, int] = (0, 0)  # MoE: the routed experts (not split by TP; split by EP in on_rank)
    router: tuple[int, int] = (0, 0)  # MoE: router and shared-expert gate

    def on_rank(self, tp: int, ep: int = 1) -> int:
        """Parameters on one GPU: a TP shard, and 1/ep of the routed experts."""
        return sum(s // tp + r for s, r in (self.qkv, self.proj, self.fc1, self.fc2, self.norms, self.router)) + \
            self.experts[1] // ep

    def largest_module(self, tp: int) -> int:
        """Largest single module on one TP rank (what ZeRO-3 gathers at once; a norm is its own module)."""
        return max(s // tp + r for s, r in (self.qkv, self.proj, self.fc1, self.fc2, (0, self.norms[1] // 2),
                                            self.experts, self.router))


def _norm_params(model: ModelConfig) -> int:
    return model.hidden_size * (2 if model.normalization == "LayerNorm" else 1)


def _expert_params(model: ModelConfig) -> int:
    """One routed expert (no biases)."""
    return model.hidden_size * model.moe_ffn_size * (3 if model.swiglu else 2)


def _layer_shapes(model: ModelConfig, moe: bool = False) -> _LayerShapes:
    """A dense layer, or with `moe` an MoE layer (its fc1/fc2 are the shared expert's, if any)."""
    h, d = model.hidden_size, model.head_dim
    f = (model.moe_shared_expert_intermediate_size or 0) if moe else model.ffn_size
    qkv_out = (model.num_attention_heads + 2 * model.num_kv_heads) * d
    bias = model.add_bias_linear and f > 0
    fc1_out = f * (2 if model.swiglu else 1)
    return _LayerShapes(
        qkv=(h * qkv_out + (qkv_out if model.qkv_bias else 0), 0),
        # Row-parallel layers shard the weight; their bias is added after the reduce, so replicated.
        proj=(model.num_attention_heads * d * h, h if model.add_bias_linear else 0),
        fc1=(h * fc1_out + (fc1_out if bias else 0), 0),
        fc2=(f * h, h if bias else 0),
        norms=(0, 2 * _norm_params(model)),
        experts=(0, model.num_experts * _expert_params(model) if moe else 0),
        router=(0, (model.num_experts * h + (h if model.moe_shared_expert_gate else 0)) if moe else 0),
    )


def lora_layer_parameters(model: ModelConfig, rank: int, targets: tuple[str, ...], tp: int = 1) -> int:
    """LoRA adapter elements of one layer on one TP rank: A (r, in) and B (out, r) per targeted linear,
    the factor on the base weight's split axis split tp-ways (megaclm.parallel.layers)."""
    h, f = model.hidden_size, model.ffn_size
    q = model.num_attention_heads * model.head_dim
    qkv_out, fc1_out = q + 2 * model.num_kv_heads * model.head_dim, f * (2 if model.swiglu else 1)
    per = {"qkv": rank * h + qkv_out * rank // tp, "proj": rank * q // tp + h * rank,
           "fc1": rank * h + fc1_out * rank // tp, "fc2": rank * f // tp + h * rank}
    return sum(per[t] for t in targets)


# QLoRA's frozen block linears (megaclm.model.quantize): bytes per element and per output row.
#   nf4: 4-bit codes, an int8 scale per 64-element block, a float32 factor per 256 blocks; int8: a float32 scale
#   and an int8 zero point per row.
QUANTIZED_BYTES = {"nf4": (0.5 + 1 / 64 + 4 / (64 * 256), 0), "int8": (1.0, 5)}


def quantized_layer_weights(model: ModelConfig, tp: int, moe: bool = False) -> tuple[int, int]:
    """(elements, output rows) of one layer's block-linear weights (qkv, proj, fc1, fc2; an MoE layer's fc1/fc2
    are its shared expert's) on one TP rank: what --base-quantization stores quantized."""
    h, d = model.hidden_size, model.head_dim
    f = (model.moe_shared_expert_intermediate_size or 0) if moe else model.ffn_size
    q, qkv_out, fc1_out = model.num_attention_heads * d, (model.num_attention_heads + 2 * model.num_kv_heads) * d, \
        f * (2 if model.swiglu else 1)
    elements = (h * qkv_out + q * h + h * fc1_out + f * h) // tp
    rows = qkv_out // tp + h + fc1_out // tp + (h if f else 0)
    return elements, rows


def count_parameters(model: ModelConfig, vocab_size: int) -> ParamCount:
    """Parameters of the model with a `vocab_size`-row embedding (pass the padded size)."""
    if vocab_size < 1:
        raise UserError(f"vocab_size={vocab_size} must be >= 1; pass the (padded) vocabulary size")
    h = model.hidden_size
    learned = model.position_embedding_type == "learned_absolute"
    moe = model.num_experts is not None
    moe_layer = _layer_shapes(model, moe=True).on_rank(1) if moe else 0
    return ParamCount(
        word_embeddings=vocab_size * h,
        position_embeddings=model.max_position_embeddings * h if learned else 0,
        layer=_layer_shapes(model).on_rank(1),
        num_layers=model.num_layers,
        final_norm=_norm_params(model),
        output_layer=vocab_size * h if model.untie_embeddings_and_output_weights else 0,
        num_moe_layers=model.num_moe_layers,
        moe_layer=moe_layer,
        expert=_expert_params(model) if moe else 0,
        num_experts=model.num_experts or 0,
        topk=model.moe_router_topk if moe else 0,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(model: ModelConfig, vocab_size: int, seq_length: int) -> float:
    """Training FLOPs per token, forward + backward: 6*N + 12*L*(a*d)*T (see the module docstring)."""
    if seq_length < 1:
        raise UserError(f"seq_length={seq_length} must be >= 1")
    n = count_parameters(model, vocab_size).flops_params
    attn_width = model.num_attention_heads * model.head_dim
    return 6.0 * n + 12.0 * model.num_layers * attn_width * seq_length


def mfu(tokens_per_second: float, flops_per_tok: float, peak_flops: float = H100_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device peak (per device)."""
    return tokens_per_second * flops_per_tok / peak_flops


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class MemorySetup:
    """How the model is trained: what the memory estimate depends on besides the model's shape."""

    seq_length: int
    micro_batch_size: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    zero_stage: int = 1
    precision: str = "bf16"
    sequence_parallel: bool = False
    grad_accum_steps: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    flash_attention: bool = True  # SDPA's fused kernels (GPU); False: materialised attention scores
    reference_ops: bool = False  # megaclm.ops' PyTorch references (--estimate-for cpu), not the fused CUDA kernels
    lora_rank: int = 0  # > 0: only LoRA adapters on `lora_targets` train; the base has no grads or optimizer states
    lora_targets: tuple[str, ...] = ()
    base_quantization: str = "none"  # QLoRA: the frozen block linears' weights in nf4 / int8 (QUANTIZED_BYTES)
    seq_split: int = 1  # ranks sharing one sample's sequence (--ds-sequence-parallel-size / --context-parallel-size)
    ring: bool = False  # the split is ring attention (context parallel), else DeepSpeed-Ulysses
    expert_parallel: int = 1  # MoE: dp or seq-split ranks splitting the routed experts (--expert-model-parallel-size)
    overlap_grad_reduce: bool = False  # --overlap-grad-reduce: a second reduce bucket where overlap_comm runs

    def __post_init__(self):
        for name in ("seq_length", "micro_batch_size", "tensor_parallel", "pipeline_parallel",
                     "data_parallel", "grad_accum_steps", "seq_split", "expert_parallel"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be >= 1")
        if (self.data_parallel * self.seq_split) % self.expert_parallel:
            raise UserError(f"expert_parallel={self.expert_parallel} must divide data_parallel={self.data_parallel} "
                            f"x seq_split={self.seq_split}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.pipeline_parallel > 1 and self.zero_stage > 1:
            raise UserError(f"zero_stage={self.zero_stage} with pipeline_parallel={self.pipeline_parallel}: "
                            "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only; use --zero-stage 1")
        if self.seq_length % self.seq_split:
            raise UserError(f"seq_length={self.seq_length} is not divisible by the sequence split {self.seq_split}")
        if self.base_quantization != "none" and (self.base_quantization not in QUANTIZED_BYTES or not self.lora_rank
                                                 or self.zero_stage == 3):
            raise UserError(f"base_quantization={self.base_quantization!r} needs one of {', '.join(QUANTIZED_BYTES)}, "
                            f"lora_rank > 0 (got {self.lora_rank}) and zero_stage 0-2 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise UserError("offload_optimizer needs ZeRO stage 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise UserError(f"offload_param needs zero_stage=3, got {self.zero_stage}")

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


# Rows of the memory table, in order. All but the last two are what DeepSpeed calls model states.
MODEL_STATE_ROWS = ("weights", "gradients", "fp32 gradients", "fp32 master weights", "Adam moments",
                    "gathered layer")
ROWS = MODEL_STATE_ROWS + ("activations", "reduce bucket")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (and per GPU's share of CPU memory) on the pipeline stage that needs the most."""

    stage: int
    params: int  # parameters on one GPU of that stage: one TP shard, before ZeRO partitioning
    largest_module: int  # largest single module on one TP rank (ZeRO-3 gathers it whole)
    gpu: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def gpu_model_states(self) -> float:
        return sum(self.gpu[r] for r in MODEL_STATE_ROWS)

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())

    def table(self) -> str:
        lines = [f"{'':22s}{'GPU GiB':>10s}{'CPU GiB':>10s}"]
        for row in ROWS:
            lines.append(f"{row:22s}{self.gpu[row] / GiB:10.2f}{self.cpu[row] / GiB:10.2f}")
        lines.append(f"{'total':22s}{self.gpu_total / GiB:10.2f}{self.cpu_total / GiB:10.2f}")
        return "\n".join(lines)


def layer_activation_bytes(model: ModelConfig, setup: MemorySetup) -> float:
    """Bytes one transformer layer keeps for backward, per micro batch, on one TP rank (no recompute)."""
    n = setup.seq_split
    s, b, h, e = setup.seq_length // n, setup.micro_batch_size, model.hidden_size, setup.activation_bytes
    keys = setup.seq_length  # what each query attends to: the whole sequence
    t = setup.tensor_parallel
    a, d, f = model.num_attention_heads, model.head_dim, model.ffn_size
    if model.num_experts is not None:  # each token's k experts and the shared one, as one wide MLP
        f = model.moe_router_topk * model.moe_ffn_size + (model.moe_shared_expert_intermediate_size or 0)
    sbh = s * b * h
    whole = 4 * sbh * e + (2 * sbh if model.hidden_dropout > 0 else 0)
    g = model.num_kv_heads
    split = s * b * (a + 2 * g) * d * e + s * b * a * d * e
    if model.position_embedding_type == "rope":
        split += s * b * (a + g) * d * e  # the rotated q, k, kept beside the QKV output (v is a view of it)
    split += (3 if model.swiglu else 2) * s * b * f * e
    if model.num_experts is not None:  # expert inputs and outputs of the k routed copies, router probabilities
        split += 2 * model.moe_router_topk * sbh * e + 4 * s * b * model.num_experts
    if setup.reference_ops:  # statistics in fp32: the norm keeps its input in fp32 (and RMSNorm the normalised x)
        whole += 2 * sbh * ((8 if model.normalization == "RMSNorm" else 4) - e) + 2 * s * b * 4
        split += s * b * f * e if model.swiglu else 0  # silu(gate), beside gate, up and their product
    if setup.ring:  # megaclm.parallel.context: explicit-score blocks of c = s_total/2n tokens, 2n+1 per rank
        c = setup.seq_length // (2 * n)
        split += (2 * n + 1) * 8 * a * b * c * (c + d)
    elif model.recompute_core_attention:
        pass  # selective recomputation: the core attention is recomputed from the Q, K, V kept above
    elif setup.flash_attention:
        split += 4 * a * s * b
    else:
        split += 2 * a * s * keys * b + (3 * a * s * keys * b if model.attention_dropout > 0 else 0)
    if setup.ring:
        split += 2 * (keys - s) * b * model.num_kv_heads * d * e  # the other ranks' keys/values, gathered
    return whole / (t if setup.sequence_parallel else 1) + split / t


def seq_split_summary(model: ModelConfig, setup: MemorySetup) -> str:
    """One line: the tokens per rank and one layer's activations against the unsplit run's."""
    mine = layer_activation_bytes(model, setup)
    whole = layer_activation_bytes(model, replace(setup, seq_split=1, ring=False, expert_parallel=1))
    return (f"{setup.seq_length // setup.seq_split} of {setup.seq_length} tokens per sample on each GPU; activations "
            f"per layer (attention included) {mine / GiB:.3f} GiB, unsplit {whole / GiB:.3f} GiB ({mine / whole:.3f}x)")


def _stage_layers(num_layers: int, stages: int) -> list[int]:
    """Transformer layers per stage, as even as possible (earlier stages take the remainder)."""
    if num_layers < stages:
        raise UserError(f"num_layers={num_layers} cannot be split across pipeline_parallel={stages} stages; "
                        "every stage needs at least one layer")
    q, r = divmod(num_layers, stages)
    return [q + (i < r) for i in range(stages)]


def _stage_model_states(p: float, largest: int, setup: MemorySetup, trainable: float | None = None,
                        shards: int | None = None) -> tuple[dict, dict]:
    """(gpu, cpu) bytes of weights, gradients and optimizer states for `p` parameters on one GPU, of
    which `trainable` (default: all) have gradients and optimizer states (the others are frozen: LoRA),
    partitioned by ZeRO over `shards` ranks (default seq x dp; routed experts: the seq x dp / ep replicas)."""
    z, n = setup.zero_stage, shards or setup.data_parallel * setup.seq_split
    mixed = setup.precision != "fp32"
    lp = 2 if mixed else 4
    weights = lp * p / n if z == 3 else lp * p
    p = p if trainable is None else trainable
    shard = p / n
    grads = lp * (shard if z >= 2 else p)
    if z == 0:
        states = {"fp32 gradients": 4 * p if mixed else 0, "fp32 master weights": 4 * p if mixed else 0,
                  "Adam moments": 8 * p}
    else:  # ZeRO keeps its own fp32 partition (a copy even in fp32) and makes fp32 grads at the step
        states = {"fp32 gradients": 4 * shard, "fp32 master weights": 4 * shard, "Adam moments": 8 * shard}
    gpu = {"weights": weights, "gradients": grads, **states,
           # ZeRO-3 all-gathers one whole module's 16-bit weights (and its gradients) at a time.
           "gathered layer": 2 * lp * largest if z == 3 else 0.0}
    cpu = dict.fromkeys(gpu, 0.0)
    if setup.offload_optimizer:
        for row in states:
            cpu[row], gpu[row] = gpu[row], 0.0
        if z == 2:  # reduced straight into the CPU fp32 gradients, bucket by bucket
            gpu["gradients"] = 0.0
        elif z == 3:  # the gradient partition lives in pinned CPU memory
            cpu["gradients"], gpu["gradients"] = gpu["gradients"], 0.0
    if setup.offload_param:
        cpu["weights"], gpu["weights"] = gpu["weights"], 0.0
    return gpu, cpu


@dataclass(frozen=True)
class StageParams:
    """Parameters one GPU of a pipeline stage holds (one tensor-parallel shard, before ZeRO)."""

    layers: int  # transformer layers on the stage
    params: int
    largest_module: int  # the largest single module (ZeRO-3 gathers it whole)
    experts: int = 0  # of `params`, this expert-parallel rank's routed experts (ZeRO: over seq x dp / ep)
    block_linears: tuple[int, int] = (0, 0)  # (elements, rows) of the block linears' weights (quantized_layer_weights)


def stage_parameters(model: ModelConfig, vocab_size: int, tensor_parallel: int = 1,
                     pipeline_parallel: int = 1, expert_parallel: int = 1) -> list[StageParams]:
    """Per pipeline stage: the first holds the embeddings, the last the final norm and the output
    layer (a tied model's last stage keeps its own copy of the word embeddings, as DeepSpeed's
    TiedLayerSpec does); layers are spread evenly. Each GPU holds 1/expert_parallel of the routed experts."""
    t, ep = tensor_parallel, expert_parallel
    for name, n in (("num_attention_heads", model.num_attention_heads), ("num_query_groups", model.num_kv_heads),
                    ("ffn_hidden_size", model.ffn_size), ("vocab_size", vocab_size),
                    ("moe_shared_expert_intermediate_size", model.moe_shared_expert_intermediate_size or 0)):
        if n % t:
            raise UserError(f"model.{name}={n} is not divisible by tensor_parallel={t}; "
                            "choose a tensor-parallel size that divides it")
    count = count_parameters(model, vocab_size)
    emb_rank = count.word_embeddings // t
    stages, start = [], 0
    for i, n_layers in enumerate(_stage_layers(model.num_layers, pipeline_parallel)):
        first, last = i == 0, i == pipeline_parallel - 1
        shapes = [_layer_shapes(model, model.is_moe_layer(j)) for j in range(start, start + n_layers)]
        start += n_layers
        params, largest = sum(x.on_rank(t, ep) for x in shapes), max(x.largest_module(t) for x in shapes)
        experts = sum(x.experts[1] // ep for x in shapes)
        blocks = [quantized_layer_weights(model, t, model.is_moe_layer(j)) for j in range(start - n_layers, start)]
        if first:
            params += emb_rank + count.position_embeddings
            largest = max(largest, emb_rank, count.position_embeddings)
        if last:
            params += count.final_norm
            if count.output_layer or not first:  # an untied head, or the tied copy on the last stage
                params += emb_rank
                largest = max(largest, emb_rank)
        stages.append(StageParams(layers=n_layers, params=params, largest_module=largest, experts=experts,
                                  block_linears=(sum(e for e, _ in blocks), sum(r for _, r in blocks))))
    return stages


def reduce_buckets(setup: MemorySetup) -> int:
    """ZeRO's whole gradient-reduction buckets on the device (see the module docstring)."""
    if setup.zero_stage == 3:
        return 1
    if setup.zero_stage == 0 or setup.reference_ops:
        return 0
    return 2 if setup.overlap_grad_reduce and overlap_comm_runs(setup.zero_stage, setup.pipeline_parallel) else 1


def estimate_memory(model: ModelConfig, vocab_size: int, setup: MemorySetup) -> MemoryEstimate:
    """Per-GPU memory of training `model` (padded vocabulary `vocab_size`) as `setup` says.

    Returns the pipeline stage with the largest GPU total; activation checkpointing follows
    model.recompute_granularity / recompute_method / recompute_num_layers.
    """
    t, pp, ep = setup.tensor_parallel, setup.pipeline_parallel, setup.expert_parallel
    if model.num_experts is not None and (setup.zero_stage == 3 or model.num_experts % ep):
        raise UserError(f"an MoE model needs zero_stage 0-2 (got {setup.zero_stage}) and expert_parallel={ep} "
                        f"dividing num_experts={model.num_experts}")
    if model.num_experts is None and ep > 1:
        raise UserError(f"expert_parallel={ep} needs an MoE model (model.num_experts)")
    stages = stage_parameters(model, vocab_size, t, pp, ep)
    s, b, h, e = setup.seq_length // setup.seq_split, setup.micro_batch_size, model.hidden_size, setup.activation_bytes
    sp = t if setup.sequence_parallel else 1
    per_layer = layer_activation_bytes(model, setup)
    best = None
    for i, stage in enumerate(stages):
        first, last = i == 0, i == pp - 1
        adapters = stage.layers * lora_layer_parameters(model, setup.lora_rank, setup.lora_targets, t)
        gpu, cpu = _stage_model_states(stage.params - stage.experts + adapters, stage.largest_module, setup,
                                       trainable=adapters if setup.lora_rank else None)
        if stage.experts:  # ZeRO partitions them over their seq x dp / ep replicas; LoRA freezes them
            egpu, ecpu = _stage_model_states(stage.experts, 0, setup, trainable=0 if setup.lora_rank else None,
                                             shards=setup.data_parallel * setup.seq_split // ep)
            gpu, cpu = ({k: a[k] + b[k] for k in a} for a, b in ((gpu, egpu), (cpu, ecpu)))
        if setup.base_quantization != "none":  # QLoRA: the frozen block linears stored quantized
            (per_element, per_row), (elements, rows) = QUANTIZED_BYTES[setup.base_quantization], stage.block_linears
            gpu["weights"] -= (2 if setup.precision != "fp32" else 4) * elements - per_element * elements \
                - per_row * rows
        in_flight = min(pp - i, setup.grad_accum_steps)
        if model.recompute_full and model.recompute_method == "uniform":
            k = min(model.recompute_num_layers, stage.layers)
            chunks = -(-stage.layers // k)
            act = in_flight * chunks * s * b * h * e / sp + k * per_layer
        elif model.recompute_full:  # block: the first k layers recomputed one at a time, the rest stored
            k = min(model.recompute_num_layers, stage.layers)
            act = in_flight * (k * s * b * h * e / sp + (stage.layers - k) * per_layer) + per_layer
        else:
            act = in_flight * stage.layers * per_layer
        if first and model.hidden_dropout > 0:
            act += in_flight * s * b * h / sp
        if last:  # final norm input and output-layer input, then what the cross-entropy keeps:
            # GPTModel's fused linear cross-entropy (tp=1) only the fp32 log-sum-exp; the pipeline's loss
            # (GPTPipelineModule.loss, any tp) and tp > 1 the fp32 (log-)softmax of the materialised logits.
            logits = s * b * vocab_size / t
            act += 2 * s * b * h * e / sp + (4 * s * b if t == 1 and pp == 1 else 4 * logits)
            if pp > 1:  # DeepSpeed's pipeline engine keeps the logits of each of the last stage's pipe buffers
                # (TrainSchedule: max(2, in flight)) after their backward, until a later forward replaces them
                act += max(2, in_flight) * logits * e
        gpu["activations"], cpu["activations"] = act, 0.0
        gpu["reduce bucket"] = reduce_buckets(setup) * ZERO_REDUCE_BUCKET * (2 if setup.precision != "fp32" else 4)
        cpu["reduce bucket"] = 0.0
        est = MemoryEstimate(stage=i, params=stage.params, largest_module=stage.largest_module, gpu=gpu, cpu=cpu)
        if best is None or est.gpu_total > best.gpu_total:
            best = est
    return best
