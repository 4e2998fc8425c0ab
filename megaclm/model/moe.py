"""Mixture-of-Experts MLP (Switch, Mixtral, Qwen2-MoE): a router, top-k routed experts, an optional shared expert.

Why megaclm's own routing and experts rather than those of DeepSpeed's MoE layer: DeepSpeed's gate always
renormalises top-k weights (Qwen2-MoE does not), has no router z-loss and no gated shared expert (its
"residual" MoE mixes by a softmax coefficient), and it dispatches through dense (tokens, experts,
capacity) masks padded to the capacity. Here routing is a pure function (`route`) and the token exchange
is one variable-size autograd all-to-all each way over `ParallelState.ep_group`, dropless without
padding. To DeepSpeed's engine the layer still is a DeepSpeed MoE layer (see Parallelism).

Shapes: N = B*T tokens, H hidden, E experts, El = E/ep on this expert-parallel rank, k experts per
token, F expert inner size, M = kept (token, expert) assignments.

    logits = x W_r^T (fp32)                     (N, E)
    pre-softmax (Switch, Qwen2-MoE):  w, e = topk(softmax(logits), k)        weights not renormalised
    default     (Mixtral):            l, e = topk(logits, k);  w = softmax(l) (= softmax-topk renormalised)
    y_t = sum_j w_tj expert_{e_tj}(x_t)  [+ sigmoid(g . x_t) shared(x_t)]

Router losses (Megatron-LM's definitions; added to the training loss, each layer's in full):
    load balancing  E/(N k) * sum_e count_e * mean_t softmax(logits)_te   (1 when perfectly balanced)
                    count_e = tokens that chose e, before capacity dropping
    z-loss          mean_t logsumexp(logits_t)^2
Capacity (`moe_expert_capacity_factor` c): expert e keeps at most ceil(c N k / E) of the assignments
of this rank's micro-batch, by router weight ('probs') or earliest token ('position'); a dropped
assignment contributes 0 (the residual stream carries the token on).
Under a sequence split (Ulysses or ring: each rank of the seq group holds part of every sample) N is the
whole micro-batch's tokens: the losses' statistics (count_e, the probabilities' sums, the sum of
logsumexp^2) are summed over the seq group before the losses are formed (an all-reduce whose backward is
an all-reduce too: every rank's loss uses the sums), and capacity is decided on every rank's (chosen,
weight) table gathered in the unsplit token order, so routing equals the unsplit micro-batch's.

Parallelism. Tensor parallel: the routed experts are not split; each TP rank runs them on the whole
sequence (gathered from SP first), so routing is identical across TP ranks. Expert parallel: EP rank r
holds experts [r El, (r+1) El) only, and runs them on the tokens every rank of its EP group routed there
(one all-to-all each way). Expert weights are therefore sharded by EP, and a layer whose experts train
is a DeepSpeed MoE layer to DeepSpeed's engine (`ExpertParallelMoE`, a subclass of
`deepspeed.moe.layer.MoE`, the class its engine recognises MoE by): expert parameters carry
`allreduce=False` and `group_name`, so the engine reduces their gradients over the expert-data-parallel
group (the dp x seq / ep ranks holding the same experts: sequence ranks are data-parallel ranks to the
experts, megaclm.parallel.state; divided by the dp size, as every other gradient), ZeRO-1/2 partitions
their states over that group, and checkpoints hold one file per expert
(DeepSpeed's `layer_{L}_expert_{e}_mp_rank_{tp}_model_states.pt`, by global expert id), found by the
module names DeepSpeed's MoE uses. The process groups are DeepSpeed's own (megaclm.parallel.state
creates them in DeepSpeed's registry). Frozen experts (LoRA) need none of that, and the engine broadcasts
them within the expert-data-parallel group by their `allreduce=False` mark alone.

Initialisation does not depend on the layout: every rank draws one seed per MoE layer from the default
generator (the same on all ranks), and expert e is drawn from its own generator seeded (seed + e), so a
rank builds only its experts and EP=1 and EP=2 start from the same weights.

State-dict keys under `layers.{i}.mlp.` (replicated across TP ranks; e is the global expert id in full
state dicts, the local one 0..El-1 in a rank's module: megaclm.model.sharding renumbers them):
    router.weight                                      (E, H)
    deepspeed_moe.experts.deepspeed_experts.{e}.fc1    (2F, H) SwiGLU rows [gate; up], else (F, H)
    deepspeed_moe.experts.deepspeed_experts.{e}.fc2    (H, F)
    shared.fc1/fc2.*       the shared expert: megaclm.model.gpt.MLP of the shared size (TP-split as it)
    shared_gate.weight     (1, H)
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups as ds_groups

from megaclm.config.model import ModelConfig
from megaclm.ops import Ops
from megaclm.parallel.layers import normal_init, scaled_normal_init, sequence_parallel_grad_hook, tp_group, tp_info
from megaclm.parallel.context import sequence_index
from megaclm.parallel.mappings import all_gather, all_reduce_sum, all_to_all, gather_from_sp, scatter_to_sp
from megaclm.parallel.state import ParallelState, expert_group_name


@dataclass
class Routing:
    token: torch.Tensor  # (M,) int64 token index of each kept assignment, sorted by expert then token
    weight: torch.Tensor  # (M,) fp32 its combine weight
    counts: torch.Tensor  # (E,) int64 kept assignments per expert
    aux_loss: torch.Tensor  # () fp32 load-balancing loss (unweighted)
    z_loss: torch.Tensor  # () fp32 router z-loss (unweighted)


@dataclass
class SeqSplit:
    """The other parts of this rank's samples under a sequence split (Ulysses or ring), for `route`."""
    group: object  # the sequence-split process group
    rank: int  # this rank's index in it
    order: torch.Tensor  # (n * N,) int64: row i of the ranks' concatenated tokens is token order[i] of the
    #                      unsplit micro-batch (b * T + t), T the whole sequence

    @classmethod
    def of(cls, group, rank: int, ring: bool, B: int, T: int, device: torch.device | None = None) -> "SeqSplit":
        """Rank `rank` of `group` holding (B, T) tokens of each sample: a contiguous slice (Ulysses) or the
        ring's two load-balanced chunks (megaclm.parallel.context.sequence_index)."""
        n = dist.get_world_size(group)
        positions = torch.stack([sequence_index(T * n, n, r, ring, device) for r in range(n)])  # (n, T) global
        order = torch.arange(B, device=device)[None, :, None] * (T * n) + positions[:, None, :]  # (n, B, T)
        return cls(group, rank, order.flatten())


def route(logits: torch.Tensor, k: int, pre_softmax: bool = False, capacity_factor: float | None = None,
          drop_policy: str = "probs", split: SeqSplit | None = None) -> Routing:
    """(N, E) fp32 router logits -> the kept (token, expert) assignments and the router losses.

    With a sequence split (`split`; collective over its group) the router losses and the capacity are those
    of the whole micro-batch, every rank's tokens together, as without the split."""
    N, E = logits.shape
    probs = logits.softmax(dim=-1)  # (N, E)
    if pre_softmax:
        top_w, top_e = probs.topk(k, dim=-1)  # (N, k)
    else:
        top_l, top_e = logits.topk(k, dim=-1)
        top_w = top_l.softmax(dim=-1)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_e, True)  # (N, E)
    gates = torch.zeros_like(probs).scatter(1, top_e, top_w)  # (N, E), differentiable in top_w
    # The load-balancing loss is not linear in the tokens: sum its statistics (and the z-loss's) over the
    # sequence split before forming it, as Megatron-LM does over TP x CP. One all-reduce of (2E + 1,).
    stats = torch.cat([chosen.sum(dim=0).float(), probs.sum(dim=0), logits.logsumexp(dim=-1).square().sum()[None]])
    n = N
    if split is not None:
        stats, n = all_reduce_sum(stats, split.group), N * dist.get_world_size(split.group)
    counts_before, probs_sum = stats[:E], stats[E:2 * E]  # (E,) tokens that chose e, before capacity dropping
    aux = E / (n * k) * (counts_before * probs_sum / n).sum()
    z = stats[2 * E] / n
    kept = chosen
    if capacity_factor is not None:
        kept = _within_capacity(chosen, gates.detach(), math.ceil(capacity_factor * n * k / E), drop_policy, split)
    expert, token = kept.t().nonzero(as_tuple=True)  # sorted by expert, then token
    return Routing(token=token, weight=gates[token, expert], counts=kept.sum(dim=0), aux_loss=aux, z_loss=z)


def _within_capacity(chosen: torch.Tensor, gates: torch.Tensor, capacity: int, drop_policy: str,
                     split: SeqSplit | None) -> torch.Tensor:
    """(N, E) chosen, gates -> (N, E) bool: the assignments each expert keeps of the micro-batch's, at most
    `capacity`, by router weight ('probs') or earliest token ('position'). Under a sequence split the
    decision is the unsplit micro-batch's: every rank's (chosen, gates) gathered into the token order."""
    N, E = chosen.shape
    if split is not None:
        parts = all_gather(torch.cat([chosen.float(), gates], dim=1), 0, split.group)  # (n N, 2E)
        whole = torch.empty_like(parts).index_copy_(0, split.order, parts)  # rows in the unsplit token order
        chosen, gates = whole[:, :E].bool(), whole[:, E:]
    rows = chosen.size(0)
    if drop_policy == "probs":
        score = gates
    else:  # earlier tokens first
        score = -torch.arange(rows, device=gates.device, dtype=torch.float32)[:, None].expand(rows, E)
    top = score.masked_fill(~chosen, -math.inf).topk(min(rows, capacity), dim=0).indices  # (capacity, E)
    kept = torch.zeros_like(chosen).scatter_(0, top, True) & chosen
    if split is not None:
        kept = kept[split.order[split.rank * N:(split.rank + 1) * N]]  # back to this rank's tokens
    return kept


EXPERTS_PREFIX = "deepspeed_moe.experts.deepspeed_experts."  # DeepSpeed's MoE module names (its checkpoints)


class Expert(nn.Module):
    """One routed expert: (m, H) -> (m, H), fc1 then GeLU or SwiGLU then fc2, no biases."""

    def __init__(self, config: ModelConfig, ops: Ops, generator: torch.Generator):
        super().__init__()
        H, F_ = config.hidden_size, config.moe_ffn_size
        self.ops, self.swiglu = ops, config.swiglu
        fc1, fc2 = torch.empty(2 * F_ if config.swiglu else F_, H), torch.empty(H, F_)
        normal_init(config.init_method_std, generator)(fc1)
        scaled_normal_init(config.init_method_std, config.num_layers, generator)(fc2)
        self.fc1, self.fc2 = nn.Parameter(fc1), nn.Parameter(fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.fc1.t()  # (m, 2F) or (m, F)
        h = self.ops.swiglu(h) if self.swiglu else self.ops.bias_gelu(h, None)
        return h @ self.fc2.t()


class Experts(nn.Module):
    """This rank's experts: `deepspeed_experts[i]` is global expert first + i, drawn from its own seed."""

    def __init__(self, config: ModelConfig, ops: Ops, first: int, count: int, seed: int, group_name: str):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(
            Expert(config, ops, torch.Generator().manual_seed(seed + e)) for e in range(first, first + count))
        for p in self.parameters():  # what DeepSpeed's engine and ZeRO treat as expert parameters
            p.allreduce, p.group_name = False, group_name

    def forward(self, x: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
        """x (M, H) rows grouped by local expert, `rows_per_expert[i]` for expert i -> (M, H)."""
        outs = [expert(rows) for expert, rows in zip(self.deepspeed_experts, x.split(rows_per_expert))]
        return torch.cat(outs) if outs else x[:0]


class MoE(nn.Module):
    """(B, S, H) -> ((B, S, H), router loss ()): the loss is coefficient-weighted, 0 outside training.

    A layer whose experts train is an `ExpertParallelMoE` (below); this base class serves frozen experts
    (LoRA adapts attention only), which DeepSpeed's engine must not see as MoE: its ZeRO optimizers refuse
    MoE layers without trainable expert parameters."""

    def __init__(self, config: ModelConfig, pstate: ParallelState, ops: Ops, shared: nn.Module | None):
        # nn.Module's, not the next class's in ExpertParallelMoE's order (DeepSpeedMoE.__init__ builds
        # DeepSpeed's gate and expert copies). What DeepSpeed's engine reads of an MoE layer is set here:
        # num_experts, ep_size, num_local_experts, expert_group_name.
        nn.Module.__init__(self)
        self.config, self.pstate = config, pstate
        self.num_experts = config.num_experts
        self.ep_size, ep_rank = pstate.ep_size, pstate.ep_rank
        self.num_local_experts = config.num_experts // self.ep_size
        self.expert_group_name = expert_group_name(self.ep_size)
        router = torch.empty(config.num_experts, config.hidden_size)
        normal_init(config.init_method_std)(router)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.router.weight = nn.Parameter(router)
        seed = int(torch.randint(2**62, (1,), device="cpu"))  # the same on every rank: one draw, any EP size
        self.deepspeed_moe = nn.Module()  # a container only, for DeepSpeed's names of the experts
        self.deepspeed_moe.experts = Experts(config, ops, ep_rank * self.num_local_experts,
                                             self.num_local_experts, seed, self.expert_group_name)
        self.shared = shared
        self.shared_gate = None
        if config.moe_shared_expert_gate:
            self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False)
            normal_init(config.init_method_std)(self.shared_gate.weight.data)
            sequence_parallel_grad_hook(self.shared_gate.weight, pstate)  # it sees this rank's SP chunk only
        self.stats: dict[str, torch.Tensor] = {}  # the last forward's unweighted router losses, for logging

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, sp = self.config, tp_info(self.pstate)[2]
        # Every TP rank routes the whole sequence; its input gradient is then whole too (split, not summed).
        full = gather_from_sp(x, tp_group(self.pstate), grad_is_partial=False) if sp else x  # (B, T, H)
        B, T, H = full.shape
        flat = full.reshape(B * T, H)
        logits = flat.float() @ self.router.weight.float().t()  # (N, E) fp32
        r = route(logits, c.moe_router_topk, c.moe_router_pre_softmax, c.moe_expert_capacity_factor,
                  c.moe_token_drop_policy, self._seq_split(B, T, logits.device))
        y = self._dispatch(flat, r).view(B, T, H)
        if sp:
            y = scatter_to_sp(y, tp_group(self.pstate))  # (B, S, H)
        if self.shared is not None:
            s = self.shared(x)
            y = y + (torch.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s)
        self.stats = {"moe_aux_loss": r.aux_loss.detach(), "moe_z_loss": r.z_loss.detach()}
        loss = logits.new_zeros(())
        if self.training:
            loss = c.moe_aux_loss_coeff * r.aux_loss + c.moe_z_loss_coeff * r.z_loss
        return y, loss

    def _seq_split(self, B: int, T: int, device: torch.device) -> SeqSplit | None:
        p = self.pstate
        if p is None or p.cp_size == 1:
            return None
        return SeqSplit.of(p.cp_group, p.cp_rank, p.cp_kind == "ring", B, T, device)

    def _dispatch(self, flat: torch.Tensor, r: Routing) -> torch.Tensor:
        """Send each kept assignment's token to its expert's EP rank, run it, bring it back, combine. (N, H)."""
        xs = flat[r.token]  # (M, H) grouped by expert
        experts, ep, local = self.deepspeed_moe.experts, self.ep_size, self.num_local_experts
        if ep == 1:
            out = experts(xs, r.counts.tolist())
        else:
            group = self.pstate.ep_group
            # counts[src, i]: rows rank src sends me for my local expert i.
            counts = all_to_all(r.counts, group, [local] * ep, [local] * ep).view(ep, -1)
            # Both count tables on the host in one transfer (the all-to-alls' split sizes): one sync per layer.
            host = torch.cat([r.counts, counts.flatten()]).tolist()
            mine, theirs = host[:ep * local], host[ep * local:]
            send = [sum(mine[j * local:(j + 1) * local]) for j in range(ep)]
            recv = [sum(theirs[j * local:(j + 1) * local]) for j in range(ep)]
            xs = all_to_all(xs, group, recv, send)  # (M', H) ordered by (source rank, local expert, token)
            local_expert = torch.repeat_interleave(torch.arange(local, device=xs.device).repeat(ep), counts.flatten(),
                                                   output_size=sum(recv))
            order = torch.argsort(local_expert, stable=True)  # regroup by local expert
            out = experts(xs[order], [sum(theirs[i::local]) for i in range(local)])
            out = all_to_all(out[torch.argsort(order)], group, send, recv)  # back in the sender's order
        out = out * r.weight[:, None].to(out.dtype)
        return torch.zeros_like(flat).index_add(0, r.token, out)


class ExpertParallelMoE(MoE, DeepSpeedMoE):
    """An MoE layer whose experts train, as DeepSpeed's engine must see it: a `deepspeed.moe.layer.MoE` (the
    class its engine recognises MoE layers by; then it reduces, partitions and saves the experts as above)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's engine asks its MoE layers for their groups: megaclm.parallel.state made them already."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ is not megaclm's expert layout; leave it unset")
        if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
            raise RuntimeError(f"no DeepSpeed expert groups {self.expert_group_name!r}: build the model with "
                               "ParallelState(..., experts=True) after its init_process_groups()")
