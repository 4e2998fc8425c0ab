"""Checks run inside spawned gloo ranks (tests/distributed/test_tensor_parallel.py, test_pipeline_parallel.py).

Every check builds the unsharded TP=1 reference from the same seed on each rank, loads the same
weights (sharded with megaclm.model.sharding) into the parallel model, and returns the largest
differences, so the parent test asserts on plain numbers. All models are fp32, tiny, dropout off
unless a check is about dropout.
"""
import dataclasses
import math

import torch
import torch.distributed as dist

from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig
from megaclm.model.gpt import GPTModel
from megaclm.model.sharding import shard_state_dict, unshard_state_dicts
from megaclm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaclm.parallel.mappings import gather_from_tp
from megaclm.parallel.random import model_parallel_seed
from megaclm.parallel.state import ParallelState
from megaclm.training.loss import normalise_loss_masks

VOCAB, B, T = 128, 2, 8
_SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=32,
              hidden_dropout=0.0, attention_dropout=0.0)
_LLAMA = dict(_SMALL, position_embedding_type="rope", normalization="RMSNorm", swiglu=True, ffn_hidden_size=48,
              add_bias_linear=False, untie_embeddings_and_output_weights=True, num_query_groups=2)
FAMILIES = {
    "gpt2": dict(_SMALL),
    "llama": dict(_LLAMA, use_rope_scaling=True, rope_scaling_factor=4.0, rope_original_max_position_embeddings=16),
    "mistral": dict(_LLAMA, window_size=3),
    "qwen2": dict(_LLAMA, add_qkv_bias=True, untie_embeddings_and_output_weights=False, rotary_base=1e6),
    "alibi": dict(_SMALL, position_embedding_type="alibi", normalization="RMSNorm"),
    "neox": dict(_SMALL, position_embedding_type="rope", rotary_percent=0.5, untie_embeddings_and_output_weights=True),
}
# Families whose check also passes document ids and restarting position ids, or runs the unfused attention.
WITH_DOC_MASK = {"gpt2", "alibi", "qwen2"}
UNFUSED = {"mistral", "neox"}


def family_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**FAMILIES[name], **overrides})


def batch(seed: int = 0, documents: bool = False):
    """Same on every rank: ids, labels, per-token loss weights, position ids, document ids (B, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 5, (B, T), generator=g)  # the padded tail of the vocab is never a label
    labels = torch.randint(0, VOCAB - 5, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g)
    if not documents:
        return ids, labels, weights, None, None
    # Two documents per row, boundary after token 3 in row 0 and after token 5 in row 1.
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[0, 4:], doc[1, 6:] = 1, 1
    start = torch.tensor([[0] * 4 + [4] * 4, [0] * 6 + [6] * 2])
    pos = torch.arange(T).expand(B, T) - start
    return ids, labels, weights, pos, doc


def reference(config: ModelConfig, seed: int = 1234, kernels: KernelsConfig | None = None) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(config, VOCAB, ParallelState.single(), kernels)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def forward_backward(model, ids, labels, weights, pos, doc):
    """(logits, loss) and the backward of sum(loss * weights)."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(ids, pos, doc)
    loss = model(ids, pos, doc, labels=labels)
    (loss * weights).sum().backward()
    return logits, loss.detach()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def gather_shards(local: dict, pstate: ParallelState) -> list[dict]:
    shards = [None] * pstate.tp_size
    dist.all_gather_object(shards, local, group=pstate.tp_group)
    return shards


def check_tp_family(name: str, world_size: int, rank: int, sequence_parallel: bool) -> dict:
    """TP = world_size (optionally with SP) vs the TP=1 model with the same weights: logits, loss, grads."""
    config = family_config(name)
    kernels = KernelsConfig(attention_backend="unfused" if name in UNFUSED else "sdpa")
    inputs = batch(seed=7, documents=name in WITH_DOC_MASK)
    ref = reference(config, kernels=kernels)
    ref_logits, ref_loss = forward_backward(ref, *inputs)
    ref_grads = grads(ref)

    pstate = ParallelState(world_size, rank, tensor_parallel_size=world_size, sequence_parallel=sequence_parallel)
    pstate.init_process_groups()
    torch.manual_seed(1234)  # the reference's seed: initial weights must be its shards, whatever the TP size
    model = GPTModel(config, VOCAB, pstate, kernels)
    shards = shard_state_dict(ref.state_dict(), config, pstate.tp_size, pstate.tp_rank)
    init_diff = max_diff(model.state_dict(), shards)
    model.load_state_dict(shards)
    logits, loss = forward_backward(model, *inputs)
    full_grads = unshard_state_dicts(gather_shards(grads(model), pstate), config)
    return {
        "init": init_diff,
        "logits_shape": tuple(logits.shape),
        "logits": (gather_from_tp(logits, pstate.tp_group) - ref_logits).abs().max().item(),
        "loss": (loss - ref_loss).abs().max().item(),
        "grads": max_diff(full_grads, ref_grads),
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
    }


def randomize_adapters(model: torch.nn.Module, seed: int = 11) -> None:
    """B starts at zero (the adapted model equals the base); random B makes the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def check_tp_lora(name: str, world_size: int, rank: int, sequence_parallel: bool) -> dict:
    """LoRA on all four linears, TP = world_size vs TP=1 with the same base and adapters: logits, loss,
    adapter gradients; and which parameters train (only the adapters, on both)."""
    from megaclm.config.lora import LoraConfig

    config, lora = family_config(name), LoraConfig(lora_rank=4, lora_alpha=8.0)
    inputs = batch(seed=9)
    torch.manual_seed(1234)  # the same reference on every rank
    ref = GPTModel(config, VOCAB, lora=lora)
    randomize_adapters(ref)
    ref_logits, ref_loss = forward_backward(ref, *inputs)
    ref_grads = grads(ref)

    pstate = ParallelState(world_size, rank, tensor_parallel_size=world_size, sequence_parallel=sequence_parallel)
    pstate.init_process_groups()
    model = GPTModel(config, VOCAB, pstate, lora=lora)
    model.load_state_dict(shard_state_dict(ref.state_dict(), config, pstate.tp_size, pstate.tp_rank))
    logits, loss = forward_backward(model, *inputs)
    full_grads = unshard_state_dicts(gather_shards(grads(model), pstate), config)
    base = reference(config)  # the same weights without adapters: the adapters must change the output
    with torch.no_grad():
        base.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" not in k})
        adapter_effect = (base(*inputs[:1]) - ref_logits).abs().max().item()
    return {"logits": (gather_from_tp(logits, pstate.tp_group) - ref_logits).abs().max().item(),
            "loss": (loss - ref_loss).abs().max().item(), "grads": max_diff(full_grads, ref_grads),
            "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
            "trainable": sorted(k for k, p in model.named_parameters() if p.requires_grad),
            "ref_trainable": sorted(ref_grads), "adapter_effect": adapter_effect}


def check_mappings(world_size: int, rank: int) -> dict:
    """Each mapping's forward and backward contract on rank-dependent data, as exact comparisons."""
    from megaclm.parallel import mappings as m

    pstate = ParallelState(world_size, rank, tensor_parallel_size=world_size)
    pstate.init_process_groups()
    group, n = pstate.tp_group, world_size
    xs = [torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6) + 100 * r for r in range(n)]  # rank r's input

    def upstream(r, shape):  # the gradient rank r's output receives
        return torch.arange(math.prod(shape), dtype=torch.float32).view(shape) * (r + 2)

    def chunk(t, dim, r=rank):
        return t.chunk(n, dim)[r]

    cases = {  # name: (fn, forward output on this rank, input gradient from the upstream gradients of all ranks)
        "copy_to_tp": (m.copy_to_tp, xs[rank], lambda G: sum(G)),
        "reduce_from_tp": (m.reduce_from_tp, sum(xs), lambda G: G[rank]),
        "scatter_to_tp": (m.scatter_to_tp, chunk(xs[rank], -1), lambda G: torch.cat(G, -1)),
        "gather_from_tp": (m.gather_from_tp, torch.cat(xs, -1), lambda G: chunk(G[rank], -1)),
        "scatter_to_sp": (m.scatter_to_sp, chunk(xs[rank], 1), lambda G: torch.cat(G, 1)),
        "gather_from_sp": (m.gather_from_sp, torch.cat(xs, 1), lambda G: chunk(sum(G), 1)),
        "gather_from_sp_replicated_grad": (lambda x, g: m.gather_from_sp(x, g, grad_is_partial=False),
                                           torch.cat(xs, 1), lambda G: chunk(G[rank], 1)),
        "reduce_scatter_to_sp": (m.reduce_scatter_to_sp, chunk(sum(xs), 1), lambda G: torch.cat(G, 1)),
    }
    out = {}
    for name, (fn, want_y, want_grad) in cases.items():
        x = xs[rank].clone().requires_grad_()
        y = fn(x, group)
        y.backward(upstream(rank, y.shape))
        out[name] = (torch.equal(y.detach(), want_y),
                     torch.equal(x.grad, want_grad([upstream(r, y.shape) for r in range(n)])))
    return out


def check_rng_streams(world_size: int, rank: int) -> dict:
    """Default stream: same dropout mask on every TP rank; model-parallel stream: different ones; both
    restart identically from the same seed."""
    from megaclm.parallel.random import model_parallel_seed, tp_rng_fork

    pstate = ParallelState(world_size, rank, tensor_parallel_size=world_size)
    pstate.init_process_groups()

    def masks():
        model_parallel_seed(5, pstate.tp_rank)
        default = torch.nn.functional.dropout(torch.ones(256), 0.5)
        with tp_rng_fork():
            split = torch.nn.functional.dropout(torch.ones(256), 0.5)
        after = torch.nn.functional.dropout(torch.ones(256), 0.5)  # the fork left the default stream alone
        return default, split, after

    first, again = masks(), masks()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, first, group=pstate.tp_group)
    return {"default_same": all(torch.equal(g[0], first[0]) and torch.equal(g[2], first[2]) for g in gathered),
            "tp_differs": not any(torch.equal(g[1], first[1]) for r, g in enumerate(gathered) if r != rank),
            "reproducible": all(torch.equal(a, b) for a, b in zip(first, again))}


def check_vocab_parallel_ce(world_size: int, rank: int) -> dict:
    pstate = ParallelState(world_size, rank, tensor_parallel_size=world_size)
    pstate.init_process_groups()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 64, generator=g) * 4
    labels = torch.randint(0, 64, (3, 5), generator=g)
    weights = torch.rand(3, 5, generator=g)
    full = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(full.view(-1, 64), labels.view(-1), reduction="none").view(3, 5)
    (ref * weights).sum().backward()
    local = logits.chunk(world_size, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, pstate.tp_group)
    (loss * weights).sum().backward()
    return {"loss": (loss - ref).abs().max().item(),
            "grad": (local.grad - full.grad.chunk(world_size, dim=-1)[rank]).abs().max().item(),
            "dtype": str(loss.dtype)}


# (name, recompute_granularity, recompute_method, recompute_num_layers)
RECOMPUTE_VARIANTS = [("none", None, "uniform", 1), ("uniform1", "full", "uniform", 1), ("uniform2", "full", "uniform", 2),
                      ("block1", "full", "block", 1), ("block3", "full", "block", 3),
                      ("selective", "selective", "uniform", 1)]


def check_activation_checkpointing(world_size: int, rank: int) -> dict:
    """TP model with dropout: grads with recomputation (full: every layer, chunks of 2, the first 1 or 3 layers
    of the block method; selective: the core attention) == without."""
    pstate = ParallelState(world_size, rank, tensor_parallel_size=world_size, sequence_parallel=True)
    pstate.init_process_groups()
    out = {}
    base = family_config("llama", num_layers=4, hidden_dropout=0.2, attention_dropout=0.2)
    results = {}
    for name, granularity, method, k in RECOMPUTE_VARIANTS:
        config = dataclasses.replace(base, recompute_granularity=granularity, recompute_method=method,
                                     recompute_num_layers=k)
        model_parallel_seed(99, pstate.tp_rank)
        model = GPTModel(config, VOCAB, pstate)
        ids, labels, weights, _, _ = batch(seed=5)
        loss = model(ids, labels=labels)
        (loss * weights).sum().backward()
        results[name] = (loss.detach(), grads(model))
    plain_loss, plain_grads = results["none"]
    for name, *_ in RECOMPUTE_VARIANTS[1:]:
        loss, g = results[name]
        out[f"{name}_loss"] = (loss - plain_loss).abs().max().item()
        out[f"{name}_grads"] = max_diff(g, plain_grads)
    # Dropout is live (else the comparison above proves little): without it the loss changes.
    model.eval()
    with torch.no_grad():
        out["dropout_effect"] = (model(ids, labels=labels) - plain_loss).abs().max().item()
    return out


class GradRecorder(torch.optim.Optimizer):
    """A client optimizer for DeepSpeed that keeps each parameter's final gradient and changes nothing."""

    def __init__(self, named_params):
        named_params = list(named_params)
        super().__init__([p for _, p in named_params], {"lr": 0.0})
        self.names = {id(p): n for n, p in named_params}
        self.recorded = {}

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.recorded[self.names[id(p)]] = p.grad.detach().clone()


def check_pipeline(world_size: int, rank: int, family: str, tp: int, pp: int, sequence_parallel: bool = False,
                   checkpoint: bool = False, partition_method: str = "parameters") -> dict:
    """DeepSpeed pipeline engine (tp x pp x dp) vs the plain model: loss and every gradient.

    Two micro-batches per data-parallel rank; the reference averages the loss over all micro-batches of
    all dp ranks, which is what the engine's gradient (mean over micro-batches, then over dp) is.
    """
    import deepspeed

    from megaclm.model.pipe import GPTPipelineModule, load_plain_state_dict, pipe_to_plain_key

    config = family_config(family, num_layers=4, recompute_granularity="full" if checkpoint else None)
    pstate = ParallelState(world_size, rank, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                           sequence_parallel=sequence_parallel)
    pstate.init_process_groups()
    micro = [batch(seed=10 + i, documents=family in WITH_DOC_MASK) for i in range(2 * pstate.dp_size)]

    ref = reference(config)
    # The per-token loss of the global batch (megaclm.training.loss): the weights differ across micro-batches.
    ref_loss = (sum((ref(ids, pos, doc, labels=labels) * w).sum() for ids, labels, w, pos, doc in micro)
                / sum(m[2].sum() for m in micro))
    ref_loss.backward()
    ref_grads = shard_state_dict(grads(ref), config, tp, pstate.tp_rank)

    model_parallel_seed(1, pstate.tp_rank, pstate.pp_rank)
    module = GPTPipelineModule(config, VOCAB, pstate, partition_method=partition_method)
    load_plain_state_dict(module, shard_state_dict(ref.state_dict(), config, tp, pstate.tp_rank))
    recorder = GradRecorder(module.named_parameters())
    ds_config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 2,
                 "train_batch_size": B * 2 * pstate.dp_size, "steps_per_print": 10**9, "gradient_clipping": 0.0,
                 "zero_optimization": {"stage": 0},
                 "pipeline": {"pipe_partitioned": not sequence_parallel, "grad_partitioned": not sequence_parallel}}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=recorder, config=ds_config)
    if sequence_parallel:  # as build_engine does: the SP-replicated gradients summed once, at the step's end
        from megaclm.training.engine import defer_sequence_parallel_grads

        assert defer_sequence_parallel_grads(engine, pstate, zero_stage=0)
    mine = micro[2 * pstate.dp_rank: 2 * pstate.dp_rank + 2]
    # Weights act as the loss mask, scaled by the trainer's per-token normalisation over the global batch.
    data = [((ids, pos if pos is not None else torch.arange(T).expand(B, T), *(() if doc is None else (doc,))),
             (labels, weights)) for ids, labels, weights, pos, doc in mine]
    data, _ = normalise_loss_masks(data, pstate, accum=2, pipeline=True)
    loss = engine.train_batch(data_iter=iter(data))

    diffs = {pipe_to_plain_key(k, config): (g - ref_grads[pipe_to_plain_key(k, config)]).abs().max().item()
             for k, g in recorder.recorded.items()}
    # The last stage's copy of the tied embedding module carries position embeddings it never uses.
    recorded = {pipe_to_plain_key(k, config): g for k, g in recorder.recorded.items()}
    if not pstate.is_first_stage:
        recorded.pop("embedding.position_embeddings.weight", None)
    return {"stage": pstate.pp_rank, "loss": abs(loss.item() - ref_loss.item()),
            "grads": {k: (g - ref_grads[k]).abs().max().item() for k, g in recorded.items()},
            "all_keys": sorted(ref_grads), "layers": [type(f).__name__ for f in module.forward_funcs]}


def check_zero3(world_size: int, rank: int, family: str) -> dict:
    """GPTModel built under zero.Init and trained by ZeRO-3 (every parameter partitioned): the loss and
    one SGD step (lr 1, so the update is the gradient) equal the plain model's."""
    import deepspeed

    config = family_config(family)
    ids, labels, weights, pos, doc = batch(seed=3, documents=family in WITH_DOC_MASK)
    ref = reference(config)
    ref_loss = (ref(ids, pos, doc, labels=labels) * weights).sum()
    ref_loss.backward()
    ds_config = {"train_micro_batch_size_per_gpu": B, "train_batch_size": B * world_size, "steps_per_print": 10**9,
                 "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        torch.manual_seed(1234)
        model = GPTModel(config, VOCAB)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                           config=ds_config)
    loss = (engine(ids, pos, doc, labels=labels) * weights).sum()
    engine.backward(loss)
    engine.step()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        updates = {k: p.detach() - ref.state_dict()[k] for k, p in params.items()}
    return {"loss": abs(loss.item() - ref_loss.item()),
            "grads": max_diff({k: -u for k, u in updates.items()}, grads(ref))}


def world2_checks(rank: int, world_size: int) -> dict:
    """Everything the 2-rank tests assert on, in one spawn."""
    out = {("tp", name, sp): check_tp_family(name, world_size, rank, sp) for name in FAMILIES for sp in (False, True)}
    out.update({("lora", name, sp): check_tp_lora(name, world_size, rank, sp)
                for name in ("gpt2", "llama") for sp in (False, True)})
    out["mappings"] = check_mappings(world_size, rank)
    out["rng"] = check_rng_streams(world_size, rank)
    out["vocab_ce"] = check_vocab_parallel_ce(world_size, rank)
    out["checkpointing"] = check_activation_checkpointing(world_size, rank)
    out[("zero3", "gpt2")] = check_zero3(world_size, rank, "gpt2")
    out[("zero3", "llama")] = check_zero3(world_size, rank, "llama")
    out[("pipe", "gpt2")] = check_pipeline(world_size, rank, "gpt2", tp=1, pp=2)
    out[("pipe", "llama")] = check_pipeline(world_size, rank, "llama", tp=1, pp=2, checkpoint=True,
                                            partition_method="uniform")
    return out


def world4_checks(rank: int, world_size: int) -> dict:
    """TP x PP x DP = 2x2x1 (with and without SP) and 1x2x2, each against the plain model."""
    return {
        "2x2x1": check_pipeline(world_size, rank, "qwen2", tp=2, pp=2),
        "2x2x1-sp": check_pipeline(world_size, rank, "gpt2", tp=2, pp=2, sequence_parallel=True, checkpoint=True),
        "1x2x2": check_pipeline(world_size, rank, "mistral", tp=1, pp=2),
    }


def assert_pipeline_matches(results: list[dict], tol: float) -> None:
    """Parent side of check_pipeline: every stage's loss and gradients match, and all keys are covered."""
    stages = sorted({r["stage"] for r in results})
    assert stages == list(range(len(stages)))
    covered = set()
    for r in results:
        assert r["loss"] < tol, r["loss"]
        bad = {k: d for k, d in r["grads"].items() if d > tol}
        assert not bad, f"stage {r['stage']} gradients differ: {bad}"
        covered |= set(r["grads"])
    assert covered == set(results[0]["all_keys"]), set(results[0]["all_keys"]) ^ covered
