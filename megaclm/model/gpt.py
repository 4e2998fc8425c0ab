"""The GPT family (GPT-2/3, Llama, Mistral, Qwen2) as one pre-norm decoder, written as single-device code.

Parallelism lives in the layers it is built from (megaclm.parallel): with a ParallelState of tensor-
parallel size tp, the Linear/Embedding layers hold 1/tp of their weight and communicate inside; the
code here only sees local head counts. Shapes: B batch, T sequence, H hidden, nh/nkv query/key-value
heads on this rank, hd head dim, V padded vocabulary, S = T/tp under sequence parallelism else T.

Long context (pstate.cp_size = n > 1): each rank of the seq axis holds T/n tokens of every sample from the
data loader on (input_ids, position_ids, document_ids and the returned per-token loss are all (B, T/n));
position ids are the global ones, so RoPE is unchanged. Only the core attention sees other ranks' tokens:
  Ulysses (--ds-sequence-parallel-size)  DeepSpeed's DistributedAttention: all-to-all q/k/v from
      (B, T/n, nh, hd) to (B, T, nh/n, hd), megaclm's core attention, all-to-all back
  ring (--context-parallel-size)         megaclm.parallel.context.ring_attention over load-balanced chunks

State-dict keys (full, unsharded shapes; "tp: dim d" = split along d, as the parallel layers declare it on the
parameter and megaclm.model.sharding reads it):
    embedding.word_embeddings.weight            (V, H)                  tp: dim 0
    embedding.position_embeddings.weight        (max_pos, H)            learned_absolute only
    layers.{i}.input_norm.weight / .bias        (H,)                    bias with LayerNorm only
    layers.{i}.attention.qkv.weight             ((nh + 2 nkv) hd, H)    rows [q heads; k heads; v heads], tp: each block dim 0
    layers.{i}.attention.qkv.bias               ((nh + 2 nkv) hd,)      add_bias_linear or add_qkv_bias
    layers.{i}.attention.proj.weight / .bias    (H, nh hd) / (H,)       tp: weight dim 1
    layers.{i}.post_attention_norm.weight / .bias (H,)
    layers.{i}.mlp.fc1.weight / .bias           (F, H), SwiGLU (2F, H) rows [gate; up]   tp: each block dim 0
    layers.{i}.mlp.fc2.weight / .bias           (H, F) / (H,)           tp: weight dim 1
    layers.{i}.mlp.router.weight, .deepspeed_moe.experts.deepspeed_experts.{e}.fc1/.fc2, .shared*
                                                MoE layers instead of fc1/fc2 (megaclm.model.moe): routed
                                                expert e (global id; split by EP, not TP)
    layers.{i}.*.{qkv,proj,fc1,fc2}.lora_a / .lora_b   LoRA only (megaclm.model.lora): A (r, in), B (out, r);
                                                the factor on the base weight's split axis is split like it
    final_norm.weight / .bias                   (H,)
    output_layer.weight                         (V, H)                  untied only, tp: dim 0
Within q/k/v rows, head j occupies rows [j hd, (j+1) hd); query head j attends with key/value head
j // (nh / nkv). RoPE pairs dims (i, i + rot/2) of each head (rotate-half layout, as HF Llama).
"""

from dataclasses import dataclass

import deepspeed
import torch
import torch.nn as nn
from deepspeed.sequence.layer import DistributedAttention

from megaclm.config.kernels import KernelsConfig
from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.model.attention import AttentionInputs, AttentionMasker, core_attention
from megaclm.model.moe import ExpertParallelMoE, MoE
from megaclm.model.compiled import compile_blocks
from megaclm.model.lora import freeze_base
from megaclm.model.positions import rope_inv_freq
from megaclm.ops import Ops, build_ops
from megaclm.parallel.context import gather_sequence, ring_attention, sequence_index
from megaclm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaclm.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                     column_parallel_linear, normal_init, scaled_normal_init,
                                     sequence_parallel_grad_hook, tp_group, tp_info)
from megaclm.parallel.mappings import reduce_scatter_to_sp, scatter_to_sp
from megaclm.parallel.random import tp_rng_fork
from megaclm.parallel.state import ParallelState


def sp_dropout(dropout: nn.Dropout, x: torch.Tensor, split_tokens: bool) -> torch.Tensor:
    """Dropout on the residual stream. Replicated across TP ranks it must match there (default stream);
    where each rank holds different tokens (SP, or a seq-axis split) it draws from the per-rank
    model-parallel stream."""
    with tp_rng_fork(split_tokens and dropout.training and dropout.p > 0):
        return dropout(x)


def splits_tokens(pstate: ParallelState) -> bool:
    """Whether ranks that hold the same weights also hold different tokens of a sample's residual stream."""
    return pstate.sequence_parallel or pstate.cp_size > 1


@dataclass(frozen=True)
class RingInputs:
    """What ring attention needs besides q, k, v, built once per forward (megaclm.parallel.context)."""

    token_index: torch.Tensor  # (T/n,) global indices of this rank's tokens
    key_index: torch.Tensor  # (T,) global indices of the all-gathered keys, rank-major
    document_ids: torch.Tensor | None  # (B, T/n)
    key_document_ids: torch.Tensor | None  # (B, T), rank-major like key_index
    window: int | None


class LayerInputs:
    """`(position_ids, document_ids, dtype, training) -> (AttentionInputs, RingInputs | None)`: what every
    layer's attention needs, built once per forward (GPTModel) or per pipeline stage (it travels as ids)."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, kernels: KernelsConfig):
        self.config, self.pstate, self.kernels = config, pstate, kernels
        self.kind = pstate.cp_kind
        tp, tp_rank = pstate.tp_size, pstate.tp_rank
        # Under Ulysses a rank attends with heads [r nh/(tp n), (r+1) nh/(tp n)) of its TP rank's (ALiBi slopes).
        n, r = (pstate.ulysses_size, pstate.cp_rank) if self.kind == "ulysses" else (1, 0)
        self.masker = AttentionMasker(config, tp * n, tp_rank * n + r)

    def __call__(self, position_ids, document_ids, dtype, training: bool):
        if self.kind == "ring":
            return AttentionInputs(), self._ring(position_ids, document_ids)
        if self.kind == "ulysses":  # the core attention sees the whole sequence: so must its mask
            group = self.pstate.cp_group
            position_ids = gather_sequence(position_ids, group, load_balanced=False)
            document_ids = None if document_ids is None else gather_sequence(document_ids, group, load_balanced=False)
        inputs = self.masker(position_ids, document_ids, dtype, self.config.attention_dropout if training else 0.0,
                             allow_varlen=self.kernels.attention_backend != "unfused")
        return inputs, None

    def _ring(self, position_ids, document_ids) -> RingInputs:
        """Global token indices (causality follows them, not the position ids, which restart per document)."""
        p, device, T = self.pstate, position_ids.device, position_ids.size(1)
        n = p.cp_size
        key_index = torch.cat([sequence_index(T * n, n, r, True, device) for r in range(n)])
        # Rank-major like the keys ring_attention gathers (no reordering into global order).
        key_docs = None if document_ids is None else gather_sequence(document_ids, p.cp_group, load_balanced=False)
        return RingInputs(token_index=sequence_index(T * n, n, p.cp_rank, True, device), key_index=key_index,
                          document_ids=document_ids, key_document_ids=key_docs, window=self.config.window_size)


class Norm(nn.Module):
    """LayerNorm or RMSNorm; `forward(x, residual)` returns (norm(x + residual), x + residual)."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, ops: Ops):
        super().__init__()
        self.rms, self.eps, self.ops = config.normalization == "RMSNorm", config.norm_epsilon, ops
        self.one_p = config.apply_layernorm_1p  # the scale is 1 + weight (weight initialised to 0)
        self.weight = nn.Parameter(torch.zeros(config.hidden_size) if self.one_p else torch.ones(config.hidden_size))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(config.hidden_size))
        for p in self.parameters():  # under SP each rank normalises only its sequence chunk
            sequence_parallel_grad_hook(p, pstate)

    def forward(self, x, residual=None):
        weight = self.weight + 1 if self.one_p else self.weight
        if residual is None:
            return self.ops.rms_norm(x, weight, self.eps) if self.rms else \
                self.ops.layer_norm(x, weight, self.bias, self.eps)
        if self.rms:
            return self.ops.add_rms_norm(x, residual, weight, self.eps)
        return self.ops.add_layer_norm(x, residual, weight, self.bias, self.eps)


class Embedding(nn.Module):
    """(B, T) ids -> (B, S, H): word (+ learned position) embeddings, dropout; scattered along T under SP."""

    def __init__(self, config: ModelConfig, vocab_size: int, pstate: ParallelState):
        super().__init__()
        self.pstate = pstate
        _, _, self.sp = tp_info(pstate)
        init = normal_init(config.init_method_std)
        self.word_embeddings = VocabParallelEmbedding(vocab_size, config.hidden_size, pstate, init_method=init)
        self.word_embeddings.weight.embedding_or_output = True  # its own lr under --decoupled-lr
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            # Initialised before it becomes a parameter (ZeRO-3's zero.Init partitions it at construction).
            table = torch.empty(config.max_position_embeddings, config.hidden_size)
            init(table)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, _weight=table)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids, position_ids):
        # (B, T, H) partial sums over the vocab shards: all-reduced, or under SP reduce-scattered to (B, T/tp, H)
        x = self.word_embeddings(input_ids, reduce=not self.sp)
        if self.sp:
            x = reduce_scatter_to_sp(x, tp_group(self.pstate))
        if self.position_embeddings is not None:
            pos = self.position_embeddings(position_ids)  # (B, T, H), replicated
            x = x + (scatter_to_sp(pos, tp_group(self.pstate)) if self.sp else pos)
        return sp_dropout(self.dropout, x, splits_tokens(self.pstate))


def _lora_for(lora: LoraConfig | None, name: str) -> LoraConfig | None:
    return lora if lora is not None and lora.targets(name) else None


def _lora_blocks(lora: LoraConfig | None, name: str, blocks: tuple[str, ...]) -> list[bool] | None:
    """Which row blocks of the fused linear `name` the adapter covers (--lora-target q_proj,v_proj); None: all."""
    return lora.block_mask(name, blocks) if _lora_for(lora, name) is not None else None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, pstate: ParallelState, ops: Ops, kernels: KernelsConfig,
                 lora: LoraConfig | None = None):
        super().__init__()
        tp, _, _ = tp_info(pstate)
        self.tp, self.ops, self.backend, self.pstate = tp, ops, kernels.attention_backend, pstate
        self.hd, self.nh, self.nkv = config.head_dim, config.num_attention_heads // tp, config.num_kv_heads // tp
        self.dropout_p = config.attention_dropout
        self.recompute = config.recompute_core_attention  # selective recomputation
        blocks = [config.num_attention_heads * self.hd] + [config.num_kv_heads * self.hd] * 2
        std = config.init_method_std
        self.qkv = ColumnParallelLinear(config.hidden_size, sum(blocks), pstate, bias=config.qkv_bias,
                                        init_method=normal_init(std), output_blocks=blocks,
                                        lora=_lora_for(lora, "qkv"),
                                        lora_blocks=_lora_blocks(lora, "qkv", ("q", "k", "v")))
        self.proj = RowParallelLinear(config.num_attention_heads * self.hd, config.hidden_size, pstate,
                                      bias=config.add_bias_linear,
                                      init_method=scaled_normal_init(std, config.num_layers),
                                      lora=_lora_for(lora, "proj"))
        self.inv_freq = rope_inv_freq(config) if config.position_embedding_type == "rope" else None

    def forward(self, x, position_ids, inputs: AttentionInputs, ring: RingInputs | None = None):
        """inputs: the forward's masking (megaclm.model.attention), shared by all layers; ring: set under
        context parallelism (then `inputs` is unused)."""
        qkv = self.qkv(x)  # (B, T, (nh + 2 nkv) hd): SP inputs are gathered to the full T here
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k, v = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd), v.view(B, T, self.nkv, self.hd)
        if self.inv_freq is not None:
            q, k = self.ops.rope(q, k, self.inv_freq.to(q.device), position_ids)
        dropout_p = self.dropout_p if self.training else 0.0

        ulysses = self.pstate.ulysses_size > 1

        def local_attention(q, k, v):
            # Heads differ across TP (and Ulysses) ranks: so do their dropout masks.
            with tp_rng_fork((self.tp > 1 or ulysses) and dropout_p > 0):
                return core_attention(q, k, v, inputs, dropout_p=dropout_p, backend=self.backend,
                                      softmax=self.ops.scaled_masked_softmax)  # (B, T, nh, hd)

        def attend(q, k, v):
            if ring is not None:
                return ring_attention(q, k, v, self.pstate.cp_group, token_index=ring.token_index,
                                      key_index=ring.key_index, document_ids=ring.document_ids,
                                      key_document_ids=ring.key_document_ids, window=ring.window)
            if ulysses:  # (B, T/n, nh, hd) -> all-to-all -> (B, T, nh/n, hd) -> attention -> back
                return DistributedAttention(local_attention, self.pstate.cp_group, scatter_idx=2,
                                            gather_idx=1)(q, k, v, 0)
            return local_attention(q, k, v)

        if self.recompute and torch.is_grad_enabled():
            # DeepSpeed's checkpoint replays the RNG tracker, so the recomputed dropout mask is the same.
            y = deepspeed.checkpointing.checkpoint(attend, q, k, v)
        else:
            y = attend(q, k, v)
        return self.proj(y.reshape(B, T, self.nh * self.hd))  # (B, S, H)


MLP_BLOCKS = {True: ("gate", "up"), False: ("up",)}  # fc1's row blocks, by config.swiglu


class MLP(nn.Module):
    """The dense MLP; `ffn` overrides config.ffn_size (an MoE layer's shared expert)."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, ops: Ops, lora: LoraConfig | None = None,
                 ffn: int | None = None):
        super().__init__()
        self.ops, self.swiglu, ffn = ops, config.swiglu, ffn or config.ffn_size
        blocks = [ffn, ffn] if config.swiglu else [ffn]  # SwiGLU rows [gate; up], split so each rank has both
        std = config.init_method_std
        self.fc1 = ColumnParallelLinear(config.hidden_size, sum(blocks), pstate, bias=config.add_bias_linear,
                                        init_method=normal_init(std), output_blocks=blocks,
                                        lora=_lora_for(lora, "fc1"),
                                        lora_blocks=_lora_blocks(lora, "fc1", MLP_BLOCKS[self.swiglu]))
        self.fc2 = RowParallelLinear(ffn, config.hidden_size, pstate, bias=config.add_bias_linear,
                                     init_method=scaled_normal_init(std, config.num_layers),
                                     lora=_lora_for(lora, "fc2"))

    def forward(self, x):
        h = self.fc1(x, add_bias=self.swiglu)  # (B, T, F/tp) or (B, T, 2F/tp)
        h = self.ops.swiglu(h) if self.swiglu else self.ops.bias_gelu(h, self.fc1.bias)
        return self.fc2(h)  # (B, S, H)


def recompute(function, *args):
    """Run `function(*args)` under DeepSpeed's (reentrant) activation checkpoint, which replays the RNG tracker
    so dropout matches. Its backward runs only when its output requires grad, i.e. when an input does: under
    LoRA the frozen embedding feeds the first layers an input without grad, and the adapters inside would get
    no gradient at all. A scalar `anchor` that requires grad goes in with the inputs then. (DeepSpeed's
    non-reentrant checkpoint needs no anchor, but under ZeRO-3 it recomputes with the partitioned, empty
    parameters: found by the layout fuzzer.)"""
    if any(torch.is_tensor(a) and a.requires_grad for a in args):
        return deepspeed.checkpointing.checkpoint(function, *args)
    anchor = torch.ones((), device=args[0].device, requires_grad=True)
    return deepspeed.checkpointing.checkpoint(lambda _, *inputs: function(*inputs), anchor, *args)


class TransformerLayer(nn.Module):
    """Pre-norm block: h + drop(attn(norm(h))), then + drop(mlp(norm(.))).
    (B, S, H) -> ((B, S, H), router loss ()): the MoE router losses of this layer, 0 for a dense MLP."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, ops: Ops, kernels: KernelsConfig,
                 lora: LoraConfig | None = None, index: int = 0):
        super().__init__()
        self.split_tokens = splits_tokens(pstate)
        self.input_norm = Norm(config, pstate, ops)
        self.attention = Attention(config, pstate, ops, kernels, lora)
        self.post_attention_norm = Norm(config, pstate, ops)
        if config.is_moe_layer(index):
            shared = config.moe_shared_expert_intermediate_size
            moe = MoE if lora is not None else ExpertParallelMoE  # LoRA freezes the experts (megaclm.model.moe)
            self.mlp = moe(config, pstate, ops, shared=MLP(config, pstate, ops, lora, ffn=shared) if shared else None)
        else:
            self.mlp = MLP(config, pstate, ops, lora)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h, position_ids, inputs: AttentionInputs = AttentionInputs(),  # default: plain causal
                ring: RingInputs | None = None):
        a = sp_dropout(self.dropout, self.attention(self.input_norm(h), position_ids, inputs, ring), self.split_tokens)
        x, h = self.post_attention_norm(a, residual=h)
        if isinstance(self.mlp, MoE):
            y, router_loss = self.mlp(x)
        else:
            y, router_loss = self.mlp(x), h.new_zeros((), dtype=torch.float32)
        return h + sp_dropout(self.dropout, y, self.split_tokens), router_loss


def output_logits(h: torch.Tensor, weight: torch.Tensor, pstate: ParallelState) -> torch.Tensor:
    """(B, S, H) final hidden -> (B, T, V/tp) logits of this rank's vocabulary shard."""
    return column_parallel_linear(h, weight, None, tp_group(pstate), tp_info(pstate)[2])


def masked_loss_sum(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """sum(loss x loss_mask) of a micro-batch: with the mask scaled by megaclm.training.loss, the engines'
    averaging over micro-batches and ranks turns the sum into the global batch's per-token loss. The plain
    trainer's micro-batch loss and the pipeline's loss_fn."""
    return (losses.float() * loss_mask).sum()


def run_layers(layers, config: ModelConfig, h, position_ids, inputs: AttentionInputs, ring: RingInputs | None,
               router_loss: torch.Tensor):
    """(B, S, H) -> ((B, S, H), router_loss + the layers' router losses ()): consecutive transformer layers, the
    whole model's or one pipeline stage's, with full recomputation as configured.
    Keep only each chunk's input; DeepSpeed's checkpoint replays the RNG tracker so dropout matches.
    uniform: chunks of k layers; block: the first k layers one by one, the others stored whole."""
    if not (config.recompute_full and torch.is_grad_enabled()):
        for layer in layers:
            h, loss = layer(h, position_ids, inputs, ring)
            router_loss = router_loss + loss
        return h, router_loss
    k = config.recompute_num_layers
    chunks = ([layers[i:i + k] for i in range(0, len(layers), k)] if config.recompute_method == "uniform"
              else [layers[i:i + 1] for i in range(len(layers))])
    for n, chunk in enumerate(chunks):

        def run(x, pos, chunk=chunk):  # the router loss is an output, so its gradient reaches the recompute
            total = x.new_zeros((), dtype=torch.float32)
            for layer in chunk:
                x, loss = layer(x, pos, inputs, ring)
                total = total + loss
            return x, total

        if config.recompute_method == "uniform" or n < k:
            h, loss = recompute(run, h, position_ids)
        else:
            h, loss = run(h, position_ids)
        router_loss = router_loss + loss
    return h, router_loss


MOE_STATS = ("router_loss", "moe_aux_loss", "moe_z_loss")  # GPTModel.moe_stats' keys


def moe_stat_sums(layers) -> list[torch.Tensor]:
    """[sum of the unweighted load-balancing losses, sum of the z-losses] of the MoE layers among `layers`
    in their last forward."""
    moe = [layer.mlp for layer in layers if isinstance(layer.mlp, MoE)]
    return [sum(m.stats[k] for m in moe) for k in MOE_STATS[1:]]


class OutputLayer(ColumnParallelLinear):
    """The untied output layer's weight (V/tp, H), applied by output_logits or the fused linear cross-entropy."""

    def __init__(self, config: ModelConfig, vocab_size: int, pstate: ParallelState):
        super().__init__(config.hidden_size, vocab_size, pstate, bias=False,
                         init_method=normal_init(config.init_method_std))
        self.weight.embedding_or_output = True  # its own lr under --decoupled-lr


@dataclass(frozen=True)
class Piece:
    """One part of GPTModel, in model order: its attribute name, its class and the constructor arguments.
    GPTModel builds the list whole; the pipeline (megaclm.model.pipe) builds each stage's slice of it."""

    name: str  # "embedding", "layers.{i}", "final_norm", "output_layer"
    cls: type
    args: tuple

    def build(self) -> nn.Module:
        return self.cls(*self.args)


def model_pieces(config: ModelConfig, vocab_size: int, pstate: ParallelState, ops: Ops, kernels: KernelsConfig,
                 lora: LoraConfig | None) -> list[Piece]:
    """embedding, layers.0 .. layers.{L-1}, final_norm[, output_layer (untied)]: GPTModel's parameters."""
    pieces = [Piece("embedding", Embedding, (config, vocab_size, pstate))]
    pieces += [Piece(f"layers.{i}", TransformerLayer, (config, pstate, ops, kernels, lora, i))
               for i in range(config.num_layers)]
    pieces.append(Piece("final_norm", Norm, (config, pstate, ops)))
    if config.untie_embeddings_and_output_weights:
        pieces.append(Piece("output_layer", OutputLayer, (config, vocab_size, pstate)))
    return pieces


class GPTModel(nn.Module):
    """forward(input_ids (B, T) int64, position_ids (B, T) | None, document_ids (B, T) int | None,
    labels (B, T) | None) -> logits (B, T, V/tp), or with labels the per-token fp32 loss (B, T).
    document_ids: tokens of a sample attend only within their document (megaclm.model.attention).
    Mixture of Experts, in training: the router losses of all MoE layers (a scalar, coefficient-weighted)
    are added to every token's loss, so any token-weighted mean of it is the LM loss + the router losses
    and their gradient flows through it (also through recomputed layers). `moe_stats` holds the last
    forward's values, detached: router_loss (what was added) and the unweighted moe_aux_loss /
    moe_z_loss averaged over the MoE layers.

    `config` and `padded_vocab_size` fit the layout: megaclm.config.validate checked them (padded_vocab_size divides
    by the tensor-parallel size; config.derived.pad_vocab_size gives it).
    With `lora` enabled only the adapters train (megaclm.model.lora.freeze_base).
    """

    def __init__(self, config: ModelConfig, padded_vocab_size: int, pstate: ParallelState = ParallelState.single(),
                 kernels: KernelsConfig | None = None, lora: LoraConfig | None = None):
        super().__init__()
        if pstate.pp_size > 1:
            raise ValueError("GPTModel is one pipeline stage; build megaclm.model.pipe.GPTPipelineModule for pp > 1")
        self.config, self.pstate, self.vocab_size = config, pstate, padded_vocab_size
        self.kernels = kernels or KernelsConfig()
        ops = build_ops(self.kernels)
        self.ops = ops
        self.layer_inputs = LayerInputs(config, pstate, self.kernels)
        lora = lora if lora is not None and lora.enabled else None
        built = {p.name: p.build() for p in model_pieces(config, padded_vocab_size, pstate, ops, self.kernels, lora)}
        self.embedding = built["embedding"]
        self.layers = nn.ModuleList(built[f"layers.{i}"] for i in range(config.num_layers))
        self.moe_stats: dict[str, torch.Tensor] = {}
        self.final_norm = built["final_norm"]
        self.output_layer = built.get("output_layer")
        # The output weight is used in this forward, not its owner's: ZeRO-3 must gather it for this module.
        deepspeed.zero.register_external_parameter(self, self.output_weight)
        if lora is not None:
            freeze_base(self)
        if self.kernels.torch_compile:
            compile_blocks(self.layers)

    @property
    def output_weight(self) -> nn.Parameter:
        return (self.output_layer or self.embedding.word_embeddings).weight

    def forward(self, input_ids, position_ids=None, document_ids=None, labels=None):
        B, T = input_ids.shape  # T: this rank's tokens (T/n of the sample under a seq-axis split)
        tp, _, sp = tp_info(self.pstate)
        if sp and T % tp:
            raise ValueError(f"sequence length {T} must be divisible by the tensor-parallel size {tp} "
                             "under sequence parallelism")
        kind = self.pstate.cp_kind
        if position_ids is None:
            n, r = self.pstate.cp_size, self.pstate.cp_rank
            position_ids = sequence_index(T * n, n, r, kind == "ring", input_ids.device).expand(B, T)
        h = self.embedding(input_ids, position_ids)  # (B, S, H)
        inputs, ring = self.layer_inputs(position_ids, document_ids, h.dtype, self.training)  # shared by all layers
        h, router_loss = run_layers(self.layers, self.config, h, position_ids, inputs, ring,
                                    h.new_zeros((), dtype=torch.float32))
        if self.config.num_experts is not None:
            n = self.config.num_moe_layers
            self.moe_stats = {"router_loss": router_loss.detach(),
                              **{k: s / n for k, s in zip(MOE_STATS[1:], moe_stat_sums(self.layers))}}
        h = self.final_norm(h)
        if labels is not None and tp == 1:  # never materialise all (B, T, V) logits
            losses = self.ops.linear_cross_entropy(h, self.output_weight, labels,
                                                   self.kernels.cross_entropy_chunk_size)
        else:
            logits = output_logits(h, self.output_weight, self.pstate)  # (B, T, V/tp)
            if labels is None:
                return logits
            losses = vocab_parallel_cross_entropy(logits, labels, tp_group(self.pstate))
        return losses + router_loss if self.training and self.config.num_experts is not None else losses
