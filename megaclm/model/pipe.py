"""GPTModel's pieces as a DeepSpeed PipelineModule: one flat LayerSpec list, built only on its stage.

    model_pieces(...) = [Embedding] + num_layers x [TransformerLayer] + [Norm] + [head]

The specs build GPTModel's own classes from GPTModel's own constructor arguments (megaclm.model.gpt.model_pieces),
and a stage runs its slice with GPTModel's own functions: the embedding, `run_layers` (recomputation included),
the final norm and `output_logits`; `loss` is GPTModel's vocab-parallel cross-entropy (+ router losses) summed
by `masked_loss_sum`, the plain trainer's micro-batch loss.
With tied embeddings the embedding is a TiedLayerSpec ("embed") that appears again as the head, so the first
and last stages each hold the table and DeepSpeed all-reduces its gradient between them; untied, the head is
GPTModel's OutputLayer.

Batch format (what the trainer's data iterator yields per micro-batch):
    ((input_ids (B, T) int64, position_ids (B, T) int64[, document_ids (B, T) int64]),
     (labels (B, T) int64, loss_mask (B, T) float))
Between stages the tuple (hidden (B, S, H), position_ids[, document_ids]) travels: a float ALiBi bias cannot
(DeepSpeed would expect a gradient for it), so each stage builds its layers' attention inputs from the ids.
The last stage returns logits (B, T, V/tp) to `loss_fn` (`GPTPipelineModule.loss`): sum(loss x loss_mask),
the mask scaled by the trainer for a per-token loss over the global batch (megaclm.training.loss). GPTModel at
tp 1 fuses the output layer into its loss instead (never all logits); a stage cannot (below, `forward`).

Mixture of Experts: the router losses of every stage must reach the loss, so the tuple carries one more
float tensor ahead of the hidden state, router (3,) fp32 = [router loss so far (coefficient-weighted,
differentiable), sum of the unweighted load-balancing losses, sum of the z-losses]:
    (router, hidden, position_ids[, document_ids])
The first stage starts it at 0, each stage adds its layers' own, and the loss adds router[0] to every token's
loss, as GPTModel.forward does; its gradient (the scaled loss-token count, with DeepSpeed's loss scaling)
comes back through DeepSpeed's own p2p backward. DeepSpeed backpropagates a stage's float outputs one
`backward` call each, in tuple order, and a stage's graph (its recomputed chunks) should be traversed once:
so a stage hands on the router as a fresh leaf, and its hidden output carries `_RouterGradient`, which feeds
the gradient that the router leaf received first into the stage's router losses within the hidden state's
backward. DeepSpeed partitions only outputs[0] between TP ranks: the trainer turns "pipe_partitioned" off for
MoE models (megaclm.training.engine). The loss keeps the micro-batch's router statistics (GPTModel.moe_stats'
keys; router_loss weighted by the scaled mask's sum) for `get_additional_losses`, which DeepSpeed's engine
sums over micro-batches, averages over accumulation and data-parallel ranks and broadcasts to every stage
after train_batch.

State-dict keys are GPTModel's (megaclm.model.gpt) renamed by DeepSpeed's layer numbering:
`embedding.*` -> `tied_modules.embed.*` (tied) or `0.*`; `layers.{i}.*` -> `{i+1}.*`;
`final_norm.*` -> `{L+1}.*`; `output_layer.weight` -> `{L+2}.weight`. `plain_to_pipe_key` and
`pipe_to_plain_key` convert; `load_plain_state_dict` loads a GPTModel (TP-shard) state dict into a stage.

Recomputation is GPTModel's (`run_layers` over the stage's transformer layers): full, method uniform, checkpoints
chunks of `recompute_num_layers` consecutive layers of a stage; method block, its first `recompute_num_layers`
layers. Selective recomputation lives inside the attention.
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
from megaclm.model.gpt import (MOE_STATS, Embedding, LayerInputs, Norm, TransformerLayer, masked_loss_sum,
                               model_pieces, moe_stat_sums, output_logits, run_layers)
from megaclm.model.lora import freeze_base
from megaclm.ops import build_ops
from megaclm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaclm.parallel.layers import tp_group
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError


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


def layer_specs(config: ModelConfig, padded_vocab_size: int, pstate: ParallelState, kernels: KernelsConfig,
                lora: LoraConfig | None = None) -> list:
    """GPTModel's pieces as DeepSpeed specs; tied embeddings: the embedding again as the head."""
    pieces = model_pieces(config, padded_vocab_size, pstate, build_ops(kernels), kernels, lora)
    specs = [LayerSpec(p.cls, *p.args) for p in pieces]
    if not config.untie_embeddings_and_output_weights:
        embedding = pieces[0]
        specs[0] = TiedLayerSpec("embed", embedding.cls, *embedding.args, tied_weight_attr=["word_embeddings.weight"])
        specs.append(specs[0])
    return specs


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
        super().__init__(
            layers=layer_specs(config, padded_vocab_size, pstate, kernels, lora), topology=pstate.pipeline_topology,
            partition_method="parameters" if partition_method == "parameters" else "type:TransformerLayer")
        self.config, self.pstate = config, pstate
        self.loss_fn = self.loss
        self.layer_inputs = LayerInputs(config, pstate, kernels)
        self.moe_stats = {k: torch.zeros(()) for k in MOE_STATS} if config.num_experts is not None else None
        if config.num_experts is not None and (empty := stages_without_moe(config, self.parts)):
            raise UserError(f"model.moe_layer_freq={config.moe_layer_freq} leaves pipeline stage(s) {empty} without "
                            "an MoE layer; DeepSpeed's ZeRO optimizer all-reduces a grad norm per parameter group "
                            "across the stages, and that stage has no expert groups (a hang): use a moe_layer_freq "
                            "that gives every stage one")
        if lora is not None:
            freeze_base(self)
        if kernels.torch_compile:
            compile_blocks(self.layers)

    # This stage's pieces (properties, not attributes: the modules are registered once, under DeepSpeed's names).
    def _piece(self, index: int):
        """The module built for spec `index` on this stage, or None if another stage holds it."""
        return self.forward_funcs[index - self._local_start] if self._local_start <= index < self._local_stop else None

    @property
    def embedding(self) -> Embedding | None:
        return self._piece(0)

    @property
    def layers(self) -> list[TransformerLayer]:
        return [f for f in self.forward_funcs if isinstance(f, TransformerLayer)]

    @property
    def final_norm(self) -> Norm | None:
        return self._piece(self.config.num_layers + 1)

    @property
    def output_weight(self) -> torch.nn.Parameter:
        """The last stage's output layer: the tied embedding table or GPTModel's OutputLayer."""
        head = self._piece(self.config.num_layers + 2)
        return head.word_embeddings.weight if isinstance(head, Embedding) else head.weight

    def forward(self, inputs):
        """inputs (first stage: the batch's ids; later: what the previous stage returned) -> the tuple for the
        next stage, or on the last stage the logits (B, T, V/tp) (MoE: (router, logits)). The output layer runs
        here, not in `loss`: DeepSpeed's engine scales gradients (accumulation, 16-bit loss scale) where they
        enter forward's outputs, so a weight used only after forward got unscaled gradients (found by
        tools/check_layout.py at TP 2 x PP 2 bf16: grad norm 5-10% low)."""
        moe = self.config.num_experts is not None
        if self.embedding is not None:
            input_ids, position_ids, *document_ids = inputs
            h = self.embedding(input_ids, position_ids)  # (B, S, H)
            router = torch.zeros(3, dtype=torch.float32, device=h.device) if moe else None
        else:
            router, (h, position_ids, *document_ids) = (inputs[0], inputs[1:]) if moe else (None, inputs)
        if self.layers:
            attn, ring = self.layer_inputs(position_ids, document_ids[0] if document_ids else None, h.dtype,
                                           self.training)
            h, loss = run_layers(self.layers, self.config, h, position_ids, attn, ring,
                                 router[0] if moe else h.new_zeros((), dtype=torch.float32))
            if moe:  # its stats are this forward's (a recompute writes the same values)
                aux, z = moe_stat_sums(self.layers)
                router = torch.stack([loss, router[1] + aux, router[2] + z])
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.stage_id == self.num_stages - 1:  # the head's stage (the norm may sit on the one before)
            logits = output_logits(h, self.output_weight, self.pstate)  # (B, T, V/tp)
            return (router, logits) if moe else logits
        if not moe:
            return h, position_ids, *document_ids
        sent = router.detach().requires_grad_()  # DeepSpeed's backward of it only sets its .grad
        return sent, _RouterGradient.apply(h, router, sent), position_ids, *document_ids

    def loss(self, outputs, labels_and_mask) -> torch.Tensor:
        """The last stage's loss_fn on its (router, logits): GPTModel's per-token loss (its vocab-parallel
        cross-entropy, the router losses on every token), summed with the scaled mask as the plain trainer does.
        MoE: `moe_stats` keeps the micro-batch's statistics (MOE_STATS, detached)."""
        labels, loss_mask = labels_and_mask
        router, logits = outputs if isinstance(outputs, tuple) else (None, outputs)
        losses = vocab_parallel_cross_entropy(logits, labels, tp_group(self.pstate))  # (B, T) fp32
        if router is not None:
            losses = losses + router[0]  # 0 outside training (MoE.forward)
            n = self.config.num_moe_layers
            self.moe_stats = {"router_loss": (router[0] * loss_mask.float().sum()).detach(),
                              "moe_aux_loss": router[1].detach() / n, "moe_z_loss": router[2].detach() / n}
        return masked_loss_sum(losses, loss_mask)

    def get_additional_losses(self):
        """DeepSpeed's hook: the last micro-batch's router statistics (MoE; the engine aggregates them). Every
        stage answers with the same keys: the others size the broadcast from the last stage by them."""
        return self.moe_stats


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
