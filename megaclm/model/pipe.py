"""GPTModel's layers as a DeepSpeed PipelineModule: one flat LayerSpec list, built only on its stage.

    [EmbeddingPipe] + num_layers x [TransformerLayerPipe] + [FinalNormPipe] + [head]

With tied embeddings the embedding is a TiedLayerSpec ("embed") that appears again as the head
(`EmbeddingPipe.head`), so the first and last stages each hold the table and DeepSpeed all-reduces its
gradient between them; untied, the head is an OutputLayerPipe.

Batch format (what the trainer's data iterator yields per micro-batch):
    ((input_ids (B, T) int64, position_ids (B, T) int64[, document_ids (B, T) int64]),
     (labels (B, T) int64, loss_mask (B, T) float))
Between stages the tuple (hidden (B, S, H), position_ids[, document_ids]) travels. The last stage
returns logits (B, T, V/tp); `loss_fn` is the vocab-parallel cross-entropy summed with the loss_mask, which
the trainer scales for a per-token loss over the global batch (megaclm.training.loss).

Mixture of Experts: the router losses of every stage must reach the loss, so the tuple carries one more
float tensor ahead of the hidden state, router (3,) fp32 = [router loss so far (coefficient-weighted,
differentiable), sum of the unweighted load-balancing losses, sum of the z-losses]:
    (router, hidden, position_ids[, document_ids])
The embedding starts it at 0, each MoE layer adds its own, the final norm and the head pass it on, and
`loss_fn` adds router[0] to every token's loss, as GPTModel.forward does; its gradient (the scaled
loss-token count, with DeepSpeed's loss scaling) comes back through DeepSpeed's own p2p backward.
DeepSpeed backpropagates a stage's float outputs one `backward` call each, in tuple order, and its
reentrant activation checkpoint cannot be traversed twice (nor should a stage's graph be): so a stage
hands on the router as a fresh leaf, and its hidden output carries `_RouterGradient`, which feeds the
gradient that the router leaf received first into the stage's router losses within the hidden state's
backward, one traversal in all (`GPTPipelineModule.forward`). DeepSpeed partitions only outputs[0]
between TP ranks: the trainer turns "pipe_partitioned" off for MoE models (megaclm.training.engine).
`loss_fn` keeps the micro-batch's router statistics (GPTModel.moe_stats' keys; router_loss weighted by
the scaled mask's sum) for `get_additional_losses`, which DeepSpeed's engine sums over micro-batches,
averages over accumulation and data-parallel ranks and broadcasts to every stage after train_batch.

State-dict keys are GPTModel's (megaclm.model.gpt) renamed by DeepSpeed's layer numbering:
`embedding.*` -> `tied_modules.embed.*` (tied) or `0.*`; `layers.{i}.*` -> `{i+1}.*`;
`final_norm.*` -> `{L+1}.*`; `output_layer.weight` -> `{L+2}.weight`. `plain_to_pipe_key` and
`pipe_to_plain_key` convert; `load_plain_state_dict` loads a GPTModel (TP-shard) state dict into a stage.

Full recomputation, method uniform: every `recompute_num_layers` consecutive layers of a stage form one
checkpointed chunk when all of them are transformer layers (DeepSpeed's activation_checkpoint_interval);
method block: the first `recompute_num_layers` transformer layers of each stage checkpoint themselves.
Selective recomputation lives inside the attention, as in GPTModel.
Sequence parallelism: the hidden state differs across the tensor-parallel ranks, so the DeepSpeed config
must set "pipeline": {"pipe_partitioned": false, "grad_partitioned": false}.
"""
import re
from typing import Callable, Mapping

import deepspeed
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from megaclm.config.kernels import KernelsConfig
from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.model.compiled import compile_blocks
from megaclm.model.gpt import MOE_STATS, Embedding, LayerInputs, Norm, TransformerLayer, output_logits, recompute
from megaclm.model.lora import freeze_base
from megaclm.model.moe import MoE
from megaclm.ops import Ops, build_ops
from megaclm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaclm.parallel.layers import ColumnParallelLinear, normal_init, tp_group
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError


def _on_hidden(fn, x):
    """fn applied to the hidden state of x: (router, hidden) of an MoE model, the router passed on; else hidden."""
    return (x[0], fn(x[1])) if isinstance(x, tuple) else fn(x)


class EmbeddingPipe(Embedding):
    def __init__(self, config: ModelConfig, *args):
        super().__init__(config, *args)
        self.carries_router = config.num_experts is not None

    def forward(self, inputs):
        input_ids, position_ids, *document_ids = inputs
        h = super().forward(input_ids, position_ids)
        router = (torch.zeros(3, dtype=torch.float32, device=h.device),) if self.carries_router else ()
        return (*router, h, position_ids, *document_ids)

    def head(self, x):
        """The tied output layer: (B, S, H) -> (B, T, V/tp), the router losses of an MoE model ahead."""
        return _on_hidden(lambda h: output_logits(h, self.word_embeddings.weight, self.pstate), x)


class TransformerLayerPipe(TransformerLayer):
    """Builds its attention inputs itself: a float ALiBi bias cannot travel between stages (DeepSpeed would
    expect a gradient for it), so each layer turns the transported document ids into its own."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, ops: Ops, kernels: KernelsConfig,
                 lora: LoraConfig | None = None, index: int = 0):
        super().__init__(config, pstate, ops, kernels, lora, index)
        self.layer_inputs = LayerInputs(config, pstate, kernels)
        self.recompute_self = False  # set for the first layers of a stage under method block
        self.carries_router = config.num_experts is not None

    def block(self, h, position_ids, attn, ring):
        """The transformer block itself: (B, S, H) -> ((B, S, H), router loss ())."""
        return TransformerLayer.forward(self, h, position_ids, attn, ring)

    def compile(self, *args, **kwargs):
        """--torch-compile (megaclm.model.compiled): the block, not this stage wrapper around it, whose
        recomputation (DeepSpeed's checkpoint and its saved-tensor hooks) torch.compile cannot trace."""
        self.block = torch.compile(self.block, *args, **kwargs)

    def forward(self, inputs):
        router, (h, position_ids, *document_ids) = (inputs[0], inputs[1:]) if self.carries_router else (None, inputs)
        attn, ring = self.layer_inputs(position_ids, document_ids[0] if document_ids else None, h.dtype, self.training)
        if self.recompute_self and torch.is_grad_enabled():
            # the router loss is an output, so its gradient reaches the recompute
            h, loss = recompute(lambda x, pos: self.block(x, pos, attn, ring), h, position_ids)
        else:
            h, loss = self.block(h, position_ids, attn, ring)
        if isinstance(self.mlp, MoE):  # its stats are this forward's (a recompute writes the same values)
            router = router + torch.stack([loss, self.mlp.stats["moe_aux_loss"], self.mlp.stats["moe_z_loss"]])
        return (router, h, position_ids, *document_ids) if self.carries_router else (h, position_ids, *document_ids)


class FinalNormPipe(Norm):
    def __init__(self, config: ModelConfig, *args):
        super().__init__(config, *args)
        self.carries_router = config.num_experts is not None

    def forward(self, inputs):
        return _on_hidden(lambda h: Norm.forward(self, h), inputs[:2] if self.carries_router else inputs[0])


class OutputLayerPipe(ColumnParallelLinear):
    """The untied output layer: (B, S, H) -> (B, T, V/tp), the router losses of an MoE model ahead."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight.embedding_or_output = True  # its own lr under --decoupled-lr

    def forward(self, x):
        return _on_hidden(lambda h: ColumnParallelLinear.forward(self, h), x)


class _RouterGradient(torch.autograd.Function):
    """hidden -> hidden; backward also gives `router` the gradient that the leaf `sent` (the router as this
    stage handed it on) received, which DeepSpeed's backward of the stage's first float output put there."""

    @staticmethod
    def forward(ctx, hidden, router, sent):
        ctx.sent = sent
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        if ctx.sent.grad is None:
            raise RuntimeError("the router losses' gradient had not arrived when the hidden state's did: DeepSpeed's "
                               "pipeline engine no longer backpropagates a stage's outputs in tuple order")
        return grad_hidden, ctx.sent.grad, None


def _embedding_head(module: EmbeddingPipe, x):
    return module.head(x)


class GPTPipeLoss:
    """sum(loss x loss_mask) of the micro-batch, the mask scaled by the trainer for a per-token loss over the
    global batch (megaclm.training.loss: the pipeline engine's averaging over micro-batches and its dp x seq
    group turns the sum into the global batch's per-token loss). MoE: every token's loss carries the router
    losses, as in GPTModel.forward; `moe_stats` holds the micro-batch's statistics (MOE_STATS, detached)."""

    def __init__(self, config: ModelConfig, pstate: ParallelState):
        self.pstate, self.num_moe_layers = pstate, config.num_moe_layers
        self.moe_stats = {k: torch.zeros(()) for k in MOE_STATS} if config.num_experts is not None else None

    def __call__(self, outputs, labels_and_mask):
        labels, loss_mask = labels_and_mask
        router, logits = outputs if isinstance(outputs, tuple) else (None, outputs)
        losses = vocab_parallel_cross_entropy(logits, labels, tp_group(self.pstate))  # (B, T) fp32
        mask = loss_mask.float()
        if router is not None:
            losses = losses + router[0]  # 0 outside training (MoE.forward)
            n = self.num_moe_layers
            self.moe_stats = {"router_loss": (router[0] * mask.sum()).detach(),  # what the router losses added
                              "moe_aux_loss": router[1].detach() / n, "moe_z_loss": router[2].detach() / n}
        return (losses * mask).sum()


def build_layer_specs(config: ModelConfig, padded_vocab_size: int, pstate: ParallelState, ops: Ops,
                      kernels: KernelsConfig, lora: LoraConfig | None = None) -> list:
    tied = not config.untie_embeddings_and_output_weights
    if tied:
        embed = TiedLayerSpec("embed", EmbeddingPipe, config, padded_vocab_size, pstate,
                              tied_weight_attr=["word_embeddings.weight"])
        head = TiedLayerSpec("embed", EmbeddingPipe, config, padded_vocab_size, pstate, forward_fn=_embedding_head,
                             tied_weight_attr=["word_embeddings.weight"])
    else:
        embed = LayerSpec(EmbeddingPipe, config, padded_vocab_size, pstate)
        head = LayerSpec(OutputLayerPipe, config.hidden_size, padded_vocab_size, pstate, bias=False,
                         init_method=normal_init(config.init_method_std))
    return ([embed] + [LayerSpec(TransformerLayerPipe, config, pstate, ops, kernels, lora, index=i)
                       for i in range(config.num_layers)]
            + [LayerSpec(FinalNormPipe, config, pstate, ops), head])


class GPTPipelineModule(PipelineModule):
    """The pipeline-parallel GPTModel. Needs torch.distributed and `pstate.init_process_groups()` done;
    wraps the default process group in DeepSpeed's comm layer if nobody did yet."""

    def __init__(self, config: ModelConfig, padded_vocab_size: int, pstate: ParallelState,
                 kernels: KernelsConfig | None = None, partition_method: str = "parameters",
                 lora: LoraConfig | None = None):
        kernels = kernels or KernelsConfig()
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        lora = lora if lora is not None and lora.enabled else None
        specs = build_layer_specs(config, padded_vocab_size, pstate, build_ops(kernels), kernels, lora)
        super().__init__(
            layers=specs, topology=pstate.pipeline_topology, loss_fn=GPTPipeLoss(config, pstate),
            partition_method="parameters" if partition_method == "parameters" else "type:TransformerLayerPipe",
            activation_checkpoint_interval=(config.recompute_num_layers if config.recompute_full
                                            and config.recompute_method == "uniform" else 0),
            activation_checkpoint_func=recompute,
            checkpointable_layers=["TransformerLayerPipe"])
        self.config, self.pstate = config, pstate
        if config.num_experts is not None and (empty := stages_without_moe(config, self.parts)):
            raise UserError(f"model.moe_layer_freq={config.moe_layer_freq} leaves pipeline stage(s) {empty} without "
                            "an MoE layer; DeepSpeed's ZeRO optimizer all-reduces a grad norm per parameter group "
                            "across the stages, and that stage has no expert groups (a hang): use a moe_layer_freq "
                            "that gives every stage one")
        if config.recompute_full and config.recompute_method == "block":
            local = [f for f in self.forward_funcs if isinstance(f, TransformerLayerPipe)]
            for layer in local[:config.recompute_num_layers]:
                layer.recompute_self = True
        if lora is not None:
            freeze_base(self)
        if kernels.torch_compile:
            compile_blocks(f for f in self.forward_funcs if isinstance(f, TransformerLayerPipe))

    def forward(self, inputs):
        outputs = super().forward(inputs)
        if self.config.num_experts is None or self.stage_id == self.num_stages - 1:
            return outputs
        router, hidden, *rest = outputs
        sent = router.detach().requires_grad_()  # DeepSpeed's backward of it only sets its .grad
        return (sent, _RouterGradient.apply(hidden, router, sent), *rest)

    def get_additional_losses(self):
        """DeepSpeed's hook: the last micro-batch's router statistics (MoE; the engine aggregates them). Every
        stage answers with the same keys: the others size the broadcast from the last stage by them."""
        return self.loss_fn.moe_stats


def stages_without_moe(config: ModelConfig, parts: list[int]) -> list[int]:
    """The pipeline stages holding no MoE layer, given DeepSpeed's partition of the LayerSpec list (stage s
    holds specs parts[s]..parts[s+1]-1; spec i in 1..L is transformer layer i-1)."""
    L = config.num_layers
    return [s for s in range(len(parts) - 1)
            if not any(config.is_moe_layer(i - 1) for i in range(max(parts[s], 1), min(parts[s + 1], L + 1)))]


def plain_to_pipe_key(key: str, config: ModelConfig) -> str:
    L = config.num_layers
    if key.startswith("embedding."):
        rest = key[len("embedding."):]
        return f"tied_modules.embed.{rest}" if not config.untie_embeddings_and_output_weights else f"0.{rest}"
    if m := re.match(r"layers\.(\d+)\.(.*)", key):
        return f"{int(m.group(1)) + 1}.{m.group(2)}"
    if key.startswith("final_norm."):
        return f"{L + 1}.{key[len('final_norm.'):]}"
    if key == "output_layer.weight":
        return f"{L + 2}.weight"
    raise KeyError(f"{key!r} is not a GPTModel state-dict key")


def pipe_to_plain_key(key: str, config: ModelConfig) -> str:
    L = config.num_layers
    if key.startswith("tied_modules.embed."):
        return "embedding." + key[len("tied_modules.embed."):]
    index, rest = key.split(".", 1)
    index = int(index)
    if index == 0:
        return "embedding." + rest
    if index <= L:
        return f"layers.{index - 1}.{rest}"
    return f"final_norm.{rest}" if index == L + 1 else "output_layer.weight"


def load_plain_state_dict(module: GPTPipelineModule, plain: Mapping[str, torch.Tensor],
                          select: Callable[[str], bool] | None = None) -> None:
    """Load the keys of a GPTModel state dict (this rank's TP shard) that live on `module`'s stage;
    `select(plain_key)` limits it to some of them (LoRA: the base or the adapters)."""
    own = [k for k in module.state_dict() if select is None or select(pipe_to_plain_key(k, module.config))]
    missing = [k for k in own if pipe_to_plain_key(k, module.config) not in plain]
    if missing:
        raise KeyError(f"the state dict lacks {missing[:5]} needed by pipeline stage {module.stage_id}")
    module.load_state_dict({k: plain[pipe_to_plain_key(k, module.config)] for k in own}, strict=select is None)
