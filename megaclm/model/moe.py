"""Mixture-of-Experts MLP (Switch, Mixtral, Qwen2-MoE): a router, top-k routed experts, an optional shared expert.

Why megaclm's own layer and not `deepspeed.moe.layer.MoE`: DeepSpeed's gate renormalises top-2/top-k
weights always (Qwen2-MoE does not), has no router z-loss, no shared expert with a sigmoid gate (its
"residual" MoE mixes by a softmax coefficient), and its engine recognises MoE only by that class, then
saves experts in per-expert files under its own module names. Here routing is a pure function
(`route`), and the token exchange is one autograd all-to-all over `ParallelState.ep_group`.

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

Parallelism. Tensor parallel: the routed experts are not split; each TP rank runs them on the whole
sequence (gathered from SP first), so routing is identical across TP ranks. Expert parallel: EP rank
r runs experts [r El, (r+1) El) on the tokens every rank of its EP group routed there. The expert
weights are kept whole on every rank (not sharded by EP) so DeepSpeed's plain data-parallel
gradient average is exact: a rank's gradient for experts it does not run is 0, so the sum over the
data-parallel group is each expert's gradient over all tokens. EP therefore splits the expert
compute and activations, not the expert weights (ZeRO-1/2 still shard their optimizer states).

State-dict keys under `layers.{i}.mlp.` (replicated across TP and EP ranks):
    router.weight          (E, H)
    experts.fc1            (E, 2F, H) SwiGLU rows [gate; up], else (E, F, H)
    experts.fc2            (E, H, F)
    shared.fc1/fc2.*       the shared expert: megaclm.model.gpt.MLP of the shared size (TP-split as it)
    shared_gate.weight     (1, H)
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from megaclm.config.model import ModelConfig
from megaclm.ops import Ops
from megaclm.parallel.layers import normal_init, scaled_normal_init, sequence_parallel_grad_hook, tp_group, tp_info
from megaclm.parallel.mappings import all_to_all, gather_from_sp, scatter_to_sp
from megaclm.parallel.state import ParallelState


@dataclass
class Routing:
    token: torch.Tensor  # (M,) int64 token index of each kept assignment, sorted by expert then token
    weight: torch.Tensor  # (M,) fp32 its combine weight
    counts: torch.Tensor  # (E,) int64 kept assignments per expert
    aux_loss: torch.Tensor  # () fp32 load-balancing loss (unweighted)
    z_loss: torch.Tensor  # () fp32 router z-loss (unweighted)


def route(logits: torch.Tensor, k: int, pre_softmax: bool = False, capacity_factor: float | None = None,
          drop_policy: str = "probs") -> Routing:
    """(N, E) fp32 router logits -> the kept (token, expert) assignments and the router losses."""
    N, E = logits.shape
    probs = logits.softmax(dim=-1)  # (N, E)
    if pre_softmax:
        top_w, top_e = probs.topk(k, dim=-1)  # (N, k)
    else:
        top_l, top_e = logits.topk(k, dim=-1)
        top_w = top_l.softmax(dim=-1)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_e, True)  # (N, E)
    gates = torch.zeros_like(probs).scatter(1, top_e, top_w)  # (N, E), differentiable in top_w
    counts_before = chosen.sum(dim=0)  # (E,)
    aux = E / (N * k) * (counts_before.float() * probs.mean(dim=0)).sum()
    z = logits.logsumexp(dim=-1).square().mean()
    kept = chosen
    if capacity_factor is not None:
        capacity = min(N, math.ceil(capacity_factor * N * k / E))
        if drop_policy == "probs":
            score = gates.detach()
        else:  # earlier tokens first
            score = -torch.arange(N, device=logits.device, dtype=torch.float32)[:, None].expand(N, E)
        rows = score.masked_fill(~chosen, -math.inf).topk(capacity, dim=0).indices  # (capacity, E)
        kept = torch.zeros_like(chosen).scatter_(0, rows, True) & chosen
    expert, token = kept.t().nonzero(as_tuple=True)  # sorted by expert, then token
    return Routing(token=token, weight=gates[token, expert], counts=kept.sum(dim=0), aux_loss=aux, z_loss=z)


class Experts(nn.Module):
    """E expert MLPs as two stacked weights; runs experts [first, first + El) on their rows."""

    def __init__(self, config: ModelConfig, ops: Ops):
        super().__init__()
        E, H, F_ = config.num_experts, config.hidden_size, config.moe_ffn_size
        self.ops, self.swiglu = ops, config.swiglu
        fc1 = torch.empty(E, 2 * F_ if config.swiglu else F_, H)
        fc2 = torch.empty(E, H, F_)
        normal_init(config.init_method_std)(fc1)  # initialised before they become parameters (zero.Init)
        scaled_normal_init(config.init_method_std, config.num_layers)(fc2)
        self.fc1, self.fc2 = nn.Parameter(fc1), nn.Parameter(fc2)

    def forward(self, x: torch.Tensor, rows_per_expert: list[int], first: int) -> torch.Tensor:
        """x (M, H) rows grouped by expert, `rows_per_expert[i]` for expert first + i -> (M, H)."""
        outs = []
        for i, rows in enumerate(x.split(rows_per_expert)):
            h = rows @ self.fc1[first + i].t()  # (m, 2F) or (m, F)
            h = self.ops.swiglu(h) if self.swiglu else self.ops.bias_gelu(h, None)
            outs.append(h @ self.fc2[first + i].t())  # (m, H)
        return torch.cat(outs) if outs else x[:0]


class MoE(nn.Module):
    """(B, S, H) -> ((B, S, H), router loss ()): the loss is coefficient-weighted, 0 outside training."""

    def __init__(self, config: ModelConfig, pstate: ParallelState | None, ops: Ops, shared: nn.Module | None):
        super().__init__()
        self.config, self.pstate = config, pstate
        self.ep = pstate.ep_size if pstate is not None else 1
        self.ep_rank = pstate.ep_rank if pstate is not None else 0
        self.local = config.num_experts // self.ep
        router = torch.empty(config.num_experts, config.hidden_size)
        normal_init(config.init_method_std)(router)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.router.weight = nn.Parameter(router)
        self.experts = Experts(config, ops)
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
                  c.moe_token_drop_policy)
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

    def _dispatch(self, flat: torch.Tensor, r: Routing) -> torch.Tensor:
        """Send each kept assignment's token to its expert's EP rank, run it, bring it back, combine. (N, H)."""
        xs = flat[r.token]  # (M, H) grouped by expert
        if self.ep == 1:
            out = self.experts(xs, r.counts.tolist(), 0)
        else:
            group = self.pstate.ep_group
            # counts[src, i]: rows rank src sends me for my local expert i.
            counts = all_to_all(r.counts, group, [self.local] * self.ep, [self.local] * self.ep).view(self.ep, -1)
            send = r.counts.view(self.ep, self.local).sum(dim=1).tolist()
            recv = counts.sum(dim=1).tolist()
            xs = all_to_all(xs, group, recv, send)  # (M', H) ordered by (source rank, local expert, token)
            local_expert = torch.repeat_interleave(torch.arange(self.local, device=xs.device).repeat(self.ep),
                                                   counts.flatten())
            order = torch.argsort(local_expert, stable=True)  # regroup by local expert
            out = self.experts(xs[order], counts.sum(dim=0).tolist(), self.ep_rank * self.local)
            out = all_to_all(out[torch.argsort(order)], group, send, recv)  # back in the sender's order
        out = out * r.weight[:, None].to(out.dtype)
        return torch.zeros_like(flat).index_add(0, r.token, out)
