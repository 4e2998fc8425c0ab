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
from megaclm.config.model import ModelConfig, check_parallel_shapes
from megaclm.config.parallel import ParallelConfig
from megaclm.model.compiled import compile_blocks
from megaclm.model.gpt import Embedding, LayerInputs, Norm, TransformerLayer, output_logits
from megaclm.model.lora import freeze_base
from megaclm.ops import Ops, build_ops
from megaclm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaclm.parallel.layers import ColumnParallelLinear, normal_init, tp_group
from megaclm.parallel.state import ParallelState


class EmbeddingPipe(Embedding):
    def forward(self, inputs):
        input_ids, position_ids, *document_ids = inputs
        h = super().forward(input_ids, position_ids)
        return (h, position_ids, *document_ids)

    def head(self, h):
        """The tied output layer: (B, S, H) -> (B, T, V/tp)."""
        return output_logits(h, self.word_embeddings.weight, self.pstate)


class TransformerLayerPipe(TransformerLayer):
    """Builds its attention inputs itself: a float ALiBi bias cannot travel between stages (DeepSpeed would
    expect a gradient for it), so each layer turns the transported document ids into its own."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, ops: Ops, kernels: KernelsConfig,
                 lora: LoraConfig | None = None):
        super().__init__(config, pstate, ops, kernels, lora)
        self.layer_inputs = LayerInputs(config, pstate, kernels)
        self.recompute_self = False  # set for the first layers of a stage under method block

    def forward(self, inputs):
        h, position_ids, *document_ids = inputs
        attn, ring = self.layer_inputs(position_ids, document_ids[0] if document_ids else None, h.dtype, self.training)
        if self.recompute_self and torch.is_grad_enabled():
            h = deepspeed.checkpointing.checkpoint(
                lambda x, pos: TransformerLayer.forward(self, x, pos, attn, ring)[0], h, position_ids)
        else:
            h, _ = super().forward(h, position_ids, attn, ring)  # dense layers only: MoE is refused with pp > 1
        return (h, position_ids, *document_ids)


class FinalNormPipe(Norm):
    def forward(self, inputs):
        return super().forward(inputs[0])


class OutputLayerPipe(ColumnParallelLinear):
    """The untied output layer: (B, S, H) -> (B, T, V/tp)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight.embedding_or_output = True  # its own lr under --decoupled-lr


def _embedding_head(module: EmbeddingPipe, h):
    return module.head(h)


class GPTPipeLoss:
    """sum(loss x loss_mask) of the micro-batch, the mask scaled by the trainer for a per-token loss over the
    global batch (megaclm.training.loss: the pipeline engine's averaging over micro-batches and its dp x seq
    group turns the sum into the global batch's per-token loss)."""

    def __init__(self, pstate: ParallelState):
        self.pstate = pstate

    def __call__(self, logits, labels_and_mask):
        labels, loss_mask = labels_and_mask
        losses = vocab_parallel_cross_entropy(logits, labels, tp_group(self.pstate))  # (B, T) fp32
        return (losses * loss_mask.float()).sum()


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
    return ([embed] + [LayerSpec(TransformerLayerPipe, config, pstate, ops, kernels, lora) for _ in range(config.num_layers)]
            + [LayerSpec(FinalNormPipe, config, pstate, ops), head])


class GPTPipelineModule(PipelineModule):
    """The pipeline-parallel GPTModel. Needs torch.distributed and `pstate.init_process_groups()` done;
    wraps the default process group in DeepSpeed's comm layer if nobody did yet."""

    def __init__(self, config: ModelConfig, padded_vocab_size: int, pstate: ParallelState,
                 kernels: KernelsConfig | None = None, partition_method: str = "parameters",
                 lora: LoraConfig | None = None):
        check_parallel_shapes(config, ParallelConfig(tensor_model_parallel_size=pstate.tp_size,
                                                     pipeline_model_parallel_size=pstate.pp_size,
                                                     pipeline_partition_method=partition_method), padded_vocab_size)
        kernels = kernels or KernelsConfig()
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        lora = lora if lora is not None and lora.enabled else None
        specs = build_layer_specs(config, padded_vocab_size, pstate, build_ops(kernels), kernels, lora)
        super().__init__(
            layers=specs, topology=pstate.pipeline_topology, loss_fn=GPTPipeLoss(pstate),
            partition_method="parameters" if partition_method == "parameters" else "type:TransformerLayerPipe",
            activation_checkpoint_interval=(config.recompute_num_layers if config.recompute_full
                                            and config.recompute_method == "uniform" else 0),
            activation_checkpoint_func=deepspeed.checkpointing.checkpoint,
            checkpointable_layers=["TransformerLayerPipe"])
        self.config, self.pstate = config, pstate
        if config.recompute_full and config.recompute_method == "block":
            local = [f for f in self.forward_funcs if isinstance(f, TransformerLayerPipe)]
            for layer in local[:config.recompute_num_layers]:
                layer.recompute_self = True
        if lora is not None:
            freeze_base(self)
        if kernels.torch_compile:
            compile_blocks(f for f in self.forward_funcs if isinstance(f, TransformerLayerPipe))


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
