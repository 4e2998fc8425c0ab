"""`model:` section - the shape and flavour of one GPT-family transformer (Megatron field names).

One config describes GPT-2/3 (learned positions, LayerNorm, GeLU, biases, tied head), Llama/Mistral
(RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head) and Qwen2 (Llama + qkv bias).
Mixture of Experts (Mixtral, Qwen2-MoE): `num_experts` routed experts replace the MLP of every
`moe_layer_freq`-th layer (megaclm.model.moe). Named shapes live in `megaclm.config.presets`. Derived sizes (`ffn_size`, `head_dim`, `num_kv_heads`)
are properties, never written back. `check_parallel_shapes` is the model-vs-parallel check that the
trainer's validate.py runs (once, before any process-group work; tools through validate.validate_layout).
"""
from dataclasses import dataclass, field

from megaclm.config.parallel import ParallelConfig
from megaclm.utils.errors import UserError

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "alibi", "none")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
MOE_TOKEN_DROP_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = field(default=12, metadata={"help": "Number of transformer layers."})
    hidden_size: int = field(default=768, metadata={"help": "Transformer hidden size (model width)."})
    ffn_hidden_size: int | None = field(default=None, metadata={
        "help": "MLP inner size. Default: 4*hidden_size, or for SwiGLU 2/3 of that rounded down to a multiple of 64."})
    num_attention_heads: int = field(default=12, metadata={"help": "Number of query heads."})
    num_query_groups: int | None = field(default=None, metadata={
        "help": "Key/value heads for grouped-query attention (1 = multi-query). Default: one per query head (MHA)."})
    kv_channels: int | None = field(default=None, metadata={
        "help": "Per-head dimension. Default: hidden_size // num_attention_heads."})
    max_position_embeddings: int = field(default=2048, metadata={
        "help": "Longest sequence the model supports (size of the learned position table; RoPE table length)."})
    position_embedding_type: str = field(default="learned_absolute", metadata={
        "help": "Positional encoding.", "choices": list(POSITION_EMBEDDING_TYPES)})
    rotary_base: float = field(default=10000.0, metadata={"help": "RoPE theta."})
    rotary_percent: float = field(default=1.0, metadata={
        "help": "Fraction of each head's dimensions that RoPE rotates (GPT-NeoX partial rotary)."})
    use_rope_scaling: bool = field(default=False, metadata={
        "help": "Apply Llama-3.1 style frequency-dependent RoPE scaling (rope_scaling_factor etc.)."})
    rope_scaling_factor: float = field(default=8.0, metadata={"help": "Llama-3 RoPE scaling factor."})
    rope_low_freq_factor: float = field(default=1.0, metadata={"help": "Llama-3 RoPE scaling low_freq_factor."})
    rope_high_freq_factor: float = field(default=4.0, metadata={"help": "Llama-3 RoPE scaling high_freq_factor."})
    rope_original_max_position_embeddings: int = field(default=8192, metadata={
        "help": "Llama-3 RoPE scaling: the context length the model was pre-trained with."})
    window_size: int | None = field(default=None, metadata={
        "help": "Sliding-window attention: each token attends to at most this many tokens (itself included). "
                "Default: full causal attention."})
    normalization: str = field(default="LayerNorm", metadata={
        "help": "Normalization layer.", "choices": list(NORMALIZATIONS)})
    norm_epsilon: float = field(default=1e-5, metadata={"help": "Epsilon of the normalization layers."})
    swiglu: bool = field(default=False, metadata={"help": "Use a SwiGLU MLP instead of GeLU."})
    add_bias_linear: bool = field(default=True, metadata={
        "help": "Biases in all linear layers. The flag --disable-bias-linear turns them off.",
        "flag": "--disable-bias-linear", "invert": True})
    add_qkv_bias: bool = field(default=False, metadata={
        "help": "Bias in the QKV projection even when --disable-bias-linear (Qwen2)."})
    untie_embeddings_and_output_weights: bool = field(default=False, metadata={
        "help": "Separate output-layer weight instead of reusing the input embedding."})
    hidden_dropout: float = field(default=0.1, metadata={"help": "Dropout on the embeddings and residual branches."})
    attention_dropout: float = field(default=0.1, metadata={"help": "Dropout on the attention probabilities."})
    init_method_std: float = field(default=0.02, metadata={
        "help": "Std of the normal init; output projections of each layer use std/sqrt(2*num_layers)."})
    make_vocab_size_divisible_by: int = field(default=128, metadata={
        "help": "Pad the vocabulary to a multiple of this times the tensor-parallel size."})
    recompute_granularity: str | None = field(default=None, metadata={
        "help": "Activation recomputation: 'full' recomputes whole transformer layers in backward, 'selective' "
                "only the core attention (softmax(QK^T)V, the largest activation per FLOP). Default: none.",
        "choices": list(RECOMPUTE_GRANULARITIES)})
    recompute_method: str = field(default="uniform", metadata={
        "help": "With full recomputation: 'uniform' keeps the input of every --recompute-num-layers-th layer and "
                "recomputes that many layers at once; 'block' recomputes only the first --recompute-num-layers "
                "layers of each pipeline stage (one at a time) and stores the rest.",
        "choices": list(RECOMPUTE_METHODS)})
    recompute_num_layers: int = field(default=1, metadata={
        "help": "Layers per recomputed chunk (uniform) or recomputed layers per stage (block)."})
    apply_layernorm_1p: bool = field(default=False, metadata={
        "help": "Zero-centred norm weights: the stored weight w (initialised to 0) scales by (1 + w), so weight "
                "decay pulls the scale towards 1 instead of 0 (Megatron's --apply-layernorm-1p)."})

    num_experts: int | None = field(default=None, metadata={
        "help": "Mixture of Experts: routed experts per MoE layer (Mixtral 8, Qwen1.5-MoE 60). Default: dense MLPs."})
    moe_router_topk: int = field(default=2, metadata={"help": "Experts each token is routed to (k)."})
    moe_ffn_hidden_size: int | None = field(default=None, metadata={
        "help": "Inner size of each routed expert. Default: the dense MLP's (--ffn-hidden-size)."})
    moe_layer_freq: int = field(default=1, metadata={
        "help": "Every N-th layer is an MoE layer (layers 0, N, 2N, ...); the others keep a dense MLP."})
    moe_router_pre_softmax: bool = field(default=False, metadata={
        "help": "Softmax over all experts, then top-k, weights not renormalised (Switch, Qwen2-MoE). "
                "Default: top-k logits, then softmax over those k (Mixtral; = softmax-top-k renormalised)."})
    moe_aux_loss_coeff: float = field(default=0.0, metadata={
        "help": "Coefficient of the load-balancing loss E * sum_e f_e P_e (f_e: fraction of routed tokens, "
                "P_e: mean router probability of expert e), added per MoE layer; 1x coeff when balanced."})
    moe_z_loss_coeff: float = field(default=0.0, metadata={
        "help": "Coefficient of the router z-loss mean(logsumexp(router logits)^2) (ST-MoE), per MoE layer."})
    moe_expert_capacity_factor: float | None = field(default=None, metadata={
        "help": "Each expert takes at most ceil(factor * tokens * k / experts) tokens of a micro-batch and rank; "
                "the rest are dropped (their expert output is 0, the residual carries them). Default: dropless."})
    moe_token_drop_policy: str = field(default="probs", metadata={
        "help": "Which tokens an expert over capacity drops: 'probs' the lowest router weights, 'position' the "
                "latest in the micro-batch.", "choices": list(MOE_TOKEN_DROP_POLICIES)})
    moe_shared_expert_intermediate_size: int | None = field(default=None, metadata={
        "help": "Inner size of a shared expert every token passes through besides its routed ones "
                "(Qwen2-MoE, DeepSeek). Default: none."})
    moe_shared_expert_gate: bool = field(default=False, metadata={
        "help": "Scale the shared expert's output by sigmoid(w . x), a learned per-token gate (Qwen2-MoE)."})

    def __post_init__(self):
        def bad(name, why):
            raise UserError(f"model.{name}={getattr(self, name)!r} {why}")

        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                     "make_vocab_size_divisible_by", "recompute_num_layers", "rope_original_max_position_embeddings"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "window_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1 (or left unset)")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            bad("position_embedding_type", f"is not one of {', '.join(POSITION_EMBEDDING_TYPES)}")
        if self.normalization not in NORMALIZATIONS:
            bad("normalization", f"is not one of {', '.join(NORMALIZATIONS)}")
        if self.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
            bad("recompute_granularity", f"is not one of {', '.join(RECOMPUTE_GRANULARITIES)} (or unset)")
        if self.recompute_method not in RECOMPUTE_METHODS:
            bad("recompute_method", f"is not one of {', '.join(RECOMPUTE_METHODS)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"is not divisible by model.num_attention_heads={self.num_attention_heads}; "
                "change one of them or set model.kv_channels")
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            bad("num_attention_heads", f"is not divisible by model.num_query_groups={self.num_query_groups}; "
                "each key/value head must serve a whole number of query heads")
        if not 0.0 < self.rotary_percent <= 1.0:
            bad("rotary_percent", "must be in (0, 1]")
        if self.position_embedding_type == "rope" and (self.head_dim * self.rotary_percent) % 2:
            bad("rotary_percent", f"gives an odd number of rotated dims for head dim {self.head_dim}; "
                "RoPE rotates pairs of dimensions")
        if self.rotary_base <= 0:
            bad("rotary_base", "must be > 0")
        if self.use_rope_scaling and not (self.rope_scaling_factor >= 1
                                          and self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
            bad("rope_scaling_factor", "needs rope_scaling_factor >= 1 and "
                "rope_high_freq_factor > rope_low_freq_factor > 0")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if self.num_experts is not None:
            if self.num_experts < 1:
                bad("num_experts", "must be >= 1 (or left unset for dense MLPs)")
            if not 1 <= self.moe_router_topk <= self.num_experts:
                bad("moe_router_topk", f"must be in [1, model.num_experts={self.num_experts}]")
            if self.moe_layer_freq < 1:
                bad("moe_layer_freq", "must be >= 1")
            for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
                if getattr(self, name) is not None and getattr(self, name) < 1:
                    bad(name, "must be >= 1 (or left unset)")
            for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
                if getattr(self, name) < 0:
                    bad(name, "must be >= 0")
            if self.moe_expert_capacity_factor is not None and self.moe_expert_capacity_factor <= 0:
                bad("moe_expert_capacity_factor", "must be > 0 (or left unset for dropless routing)")
            if self.moe_token_drop_policy not in MOE_TOKEN_DROP_POLICIES:
                bad("moe_token_drop_policy", f"is not one of {', '.join(MOE_TOKEN_DROP_POLICIES)}")
            if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
                bad("moe_shared_expert_gate", "needs model.moe_shared_expert_intermediate_size (a shared expert)")
        if self.init_method_std <= 0:
            bad("init_method_std", "must be > 0")
        if self.norm_epsilon <= 0:
            bad("norm_epsilon", "must be > 0")

    @property
    def recompute_full(self) -> bool:
        return self.recompute_granularity == "full"

    @property
    def recompute_core_attention(self) -> bool:
        return self.recompute_granularity == "selective"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:  # keep the parameter count of a 4h GeLU MLP (Megatron's rule)
            return int(4 * self.hidden_size * 2 / 3) // 64 * 64
        return 4 * self.hidden_size

    @property
    def moe_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size

    def is_moe_layer(self, index: int) -> bool:
        """Layer `index` (0-based) has routed experts instead of a dense MLP."""
        return self.num_experts is not None and index % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (even)."""
        return int(self.head_dim * self.rotary_percent)


def check_parallel_shapes(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise UserError if `model` cannot be split as `parallel` asks (run by megaclm.config.validate, before any
    process-group work; tools that change a stored model's layout call validate.validate_layout)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    what = f"parallel.tensor_model_parallel_size={tp}"
    if model.num_attention_heads % tp:
        raise UserError(f"model.num_attention_heads={model.num_attention_heads} is not divisible by {what}; "
                        "choose a tensor-parallel size that divides the number of heads")
    if model.num_kv_heads % tp:
        raise UserError(f"model.num_query_groups={model.num_kv_heads} is not divisible by {what}; "
                        "each tensor-parallel rank needs whole key/value heads")
    if model.ffn_size % tp:
        raise UserError(f"model.ffn_hidden_size={model.ffn_size} is not divisible by {what}")
    if (model.moe_shared_expert_intermediate_size or 0) % tp:
        raise UserError(f"model.moe_shared_expert_intermediate_size={model.moe_shared_expert_intermediate_size} is "
                        f"not divisible by {what} (the shared expert is split like the dense MLP)")
    ep = parallel.expert_model_parallel_size
    if ep > 1 and model.num_experts is None:
        raise UserError(f"parallel.expert_model_parallel_size={ep} needs a Mixture-of-Experts model; set "
                        "model.num_experts or drop --expert-model-parallel-size")
    if model.num_experts is not None and model.num_experts % ep:
        raise UserError(f"model.num_experts={model.num_experts} is not divisible by "
                        f"parallel.expert_model_parallel_size={ep}; every expert-parallel rank needs whole experts")
    ulysses = parallel.ds_sequence_parallel_size
    if ulysses > 1:
        # Ulysses trades sequence for heads: each rank of the group attends with 1/ulysses of this TP rank's heads.
        for count, name in ((model.num_attention_heads, "num_attention_heads"),
                            (model.num_kv_heads, "num_query_groups")):
            if (count // tp) % ulysses:
                raise UserError(f"model.{name}={count} / {what} = {count // tp} heads per tensor-parallel rank "
                                f"are not divisible by parallel.ds_sequence_parallel_size={ulysses}: DeepSpeed-"
                                "Ulysses gives every rank whole (key/value) heads; choose a "
                                "--ds-sequence-parallel-size that divides them, or --context-parallel-size "
                                "(ring attention has no such limit)")
    if parallel.context_parallel_size > 1 and model.position_embedding_type == "alibi":
        raise UserError("parallel.context_parallel_size > 1 with model.position_embedding_type='alibi': ring "
                        "attention supports causal, sliding-window and document masks, not ALiBi biases; use "
                        "--ds-sequence-parallel-size, or RoPE")
    if parallel.context_parallel_size > 1 and model.attention_dropout > 0:
        raise UserError(f"parallel.context_parallel_size > 1 with model.attention_dropout={model.attention_dropout}: "
                        "ring attention has no attention dropout (as Megatron-LM's); pass --attention-dropout 0")
    stages = f"parallel.pipeline_model_parallel_size={pp}"
    if model.num_layers < pp:
        raise UserError(f"model.num_layers={model.num_layers} cannot be split across {stages} stages; "
                        "every stage needs at least one layer")
    if parallel.pipeline_partition_method == "uniform" and model.num_layers % pp:
        raise UserError(f"model.num_layers={model.num_layers} is not divisible by {stages} with "
                        "parallel.pipeline_partition_method='uniform'; change one, or partition by 'parameters'")
