"""GPTModel in one process: every family's forward/backward, attention semantics (causality, document
masks, sliding window, unfused == SDPA), preset shapes against the published parameter counts,
sharding helpers, initialisation and config errors."""
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig, check_parallel_shapes
from megaclm.config.validate import check_vocab, validate_layout
from megaclm.config.parallel import ParallelConfig
from megaclm.config.presets import MODEL_PRESETS, PRESET_VOCAB_SIZE, model_preset
from megaclm.model import GPTModel, shard_state_dict, unshard_state_dicts
from megaclm.model.positions import alibi_slopes, rope_inv_freq
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from parallel_checks import FAMILIES, RECOMPUTE_VARIANTS, VOCAB, batch, family_config, reference  # noqa: E402

# Published parameter counts (model cards / HF configs). GPT-2 presets use GPT-3's 2048 positions
# where HF's GPT-2 checkpoints have 1024, hence the extra (2048 - 1024) * hidden.
PUBLISHED = {
    "gpt2-125m": 124_439_808 + 1024 * 768, "gpt2-350m": 354_823_168 + 1024 * 1024,
    "llama-1b": 1_235_814_400, "llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320,
    "mistral-7b": 7_241_732_096, "qwen2-0.5b": 494_032_768, "qwen2-7b": 7_615_616_512,
}


def n_params_of_preset(name):
    with torch.device("meta"):  # shapes only, no memory
        model = GPTModel(model_preset(name), PRESET_VOCAB_SIZE[name])
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_give_published_parameter_counts(name):
    assert n_params_of_preset(name) == PUBLISHED[name]


def test_gpt3_sized_presets_follow_the_12_l_h2_rule():
    for name in ("gpt2-760m", "gpt2-1.3b", "gpt2-2.7b"):
        c = model_preset(name)
        H, L, V = c.hidden_size, c.num_layers, PRESET_VOCAB_SIZE[name]
        # per layer: 4H^2 + 4H (attn) + 8H^2 + 5H (mlp) + 4H (norms); + embeddings, positions, final norm
        expect = L * (12 * H * H + 13 * H) + V * H + c.max_position_embeddings * H + 2 * H
        assert n_params_of_preset(name) == expect


def test_model_preset_overrides_and_errors():
    c = model_preset("llama-7b", num_layers=2)
    assert (c.num_layers, c.hidden_size, c.swiglu) == (2, 4096, True)
    with pytest.raises(UserError, match="unknown model preset 'llama-70b'"):
        model_preset("llama-70b")
    with pytest.raises(UserError, match="unknown model field"):
        model_preset("llama-7b", num_layer=2)
    assert set(PRESET_VOCAB_SIZE) == set(MODEL_PRESETS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_forward_backward(family):
    config = family_config(family)
    model = reference(config)
    ids, labels, weights, pos, doc = batch(seed=1, documents=True)
    logits = model(ids, pos, doc)
    assert logits.shape == (2, 8, VOCAB) and torch.isfinite(logits).all()
    loss = model(ids, pos, doc, labels=labels)  # fused chunked output layer + CE at tp=1
    assert loss.shape == (2, 8) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), reduction="none")
                               .view(2, 8), rtol=1e-5, atol=1e-5)
    (loss * weights).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unfused_attention_equals_sdpa(family):
    config = family_config(family)
    ids, _, _, pos, doc = batch(seed=2, documents=True)
    sdpa = reference(config)
    unfused = reference(config, kernels=KernelsConfig(attention_backend="unfused"))
    unfused.load_state_dict(sdpa.state_dict())
    for m in (None, doc):
        torch.testing.assert_close(unfused(ids, pos, m), sdpa(ids, pos, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal_future_tokens_do_not_change_the_past(family):
    model = reference(family_config(family)).eval()
    ids, *_ = batch(seed=3)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % VOCAB
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("family", ["gpt2", "llama", "alibi", "neox"])
def test_document_mask_and_reset_positions_equal_separate_documents(family):
    model = reference(family_config(family)).eval()
    ids, _, _, pos, doc = batch(seed=4, documents=True)  # row 0: documents [0, 4) and [4, 8)
    packed = model(ids, pos, doc)
    alone = model(ids[:1, 4:])  # the second document on its own, positions from 0
    torch.testing.assert_close(packed[:1, 4:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:1, :4], model(ids[:1, :4]), rtol=1e-5, atol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    config = family_config("mistral", num_layers=1, window_size=3)
    model = reference(config).eval()
    ids, *_ = batch(seed=5)
    base = model(ids)[:, 6]
    far = ids.clone()
    far[:, 3] = (far[:, 3] + 1) % VOCAB  # 6 - 3 = 3: outside a 3-token window (tokens 4, 5, 6)
    near = ids.clone()
    near[:, 4] = (near[:, 4] + 1) % VOCAB
    torch.testing.assert_close(model(far)[:, 6], base)
    assert not torch.allclose(model(near)[:, 6], base)


def _saved_bytes_and_grads(model, ids, labels, weights):
    """Bytes autograd keeps for backward (parameters excluded) and the parameter gradients."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (model(ids, labels=labels) * weights).sum()
    loss.backward()
    return sum(saved.values()), {n: p.grad for n, p in model.named_parameters()}


def test_recomputation_keeps_grads_and_saves_less():
    """Every recompute method gives bit-identical gradients, and each keeps less for backward than storing
    everything: selective < none, full uniform < block with 1 of 3 layers < none."""
    config = family_config("llama", num_layers=3)
    ids, labels, weights, _, _ = batch(seed=6)
    saved, results = {}, {}
    for name, granularity, method, k in RECOMPUTE_VARIANTS:
        model = reference(dataclasses.replace(config, recompute_granularity=granularity, recompute_method=method,
                                              recompute_num_layers=k), kernels=KernelsConfig(attention_backend="unfused"))
        saved[name], results[name] = _saved_bytes_and_grads(model, ids, labels, weights)
    for name, grads in results.items():
        for key, grad in results["none"].items():
            torch.testing.assert_close(grads[key], grad, rtol=0, atol=0, msg=f"{name} {key}")
    assert saved["selective"] < saved["none"]
    assert saved["uniform1"] < saved["block1"] < saved["none"]
    assert saved["block3"] == saved["uniform1"]  # all three layers of the stage


def test_init_follows_megatron():
    config = family_config("gpt2", num_layers=8, hidden_size=256, num_attention_heads=8)
    sd = reference(config).state_dict()
    assert sd["layers.0.attention.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["layers.0.mlp.fc2.weight"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert sd["layers.0.attention.proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(sd["layers.0.attention.qkv.bias"], torch.zeros_like(sd["layers.0.attention.qkv.bias"]))
    assert torch.equal(sd["final_norm.weight"], torch.ones(256))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tp", [2, 4])
def test_shard_state_dict_round_trips_and_fits_the_sharded_model(family, tp):
    config = family_config(family, **({"num_query_groups": 4} if tp == 4 else {}))  # 4 ranks need 4 kv heads
    full = reference(config).state_dict()
    shards = [shard_state_dict(full, config, tp, r) for r in range(tp)]
    back = unshard_state_dicts(shards, config)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    for rank, shard in enumerate(shards):
        # A sharded model can be built without process groups (they are looked up at forward time).
        model = GPTModel(config, VOCAB, ParallelState(tp, rank, tensor_parallel_size=tp))
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in shard.items()}
        model.load_state_dict(shard)


def test_qkv_and_swiglu_shards_keep_heads_and_gate_up_pairs_together():
    config = family_config("llama")  # 4 query heads, 2 kv heads, head dim 8, ffn 48
    full = reference(config).state_dict()
    qkv, fc1 = full["layers.0.attention.qkv.weight"], full["layers.0.mlp.fc1.weight"]
    s1 = shard_state_dict(full, config, 2, 1)
    q, k, v = qkv.split([32, 16, 16])
    assert torch.equal(s1["layers.0.attention.qkv.weight"], torch.cat([q[16:], k[8:], v[8:]]))
    gate, up = fc1.split([48, 48])
    assert torch.equal(s1["layers.0.mlp.fc1.weight"], torch.cat([gate[24:], up[24:]]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied
def test_pipeline_keys_round_trip(family):
    from megaclm.model.pipe import pipe_to_plain_key, plain_to_pipe_key

    config = family_config(family)
    keys = list(reference(config).state_dict())
    pipe_keys = [plain_to_pipe_key(k, config) for k in keys]
    assert len(set(pipe_keys)) == len(keys) and [pipe_to_plain_key(k, config) for k in pipe_keys] == keys
    tied = family == "gpt2"
    assert plain_to_pipe_key("embedding.word_embeddings.weight", config) == \
        ("tied_modules.embed.word_embeddings.weight" if tied else "0.word_embeddings.weight")
    assert plain_to_pipe_key("layers.1.mlp.fc2.weight", config) == "2.mlp.fc2.weight"
    assert plain_to_pipe_key("final_norm.weight", config) == "3.weight"
    with pytest.raises(KeyError):
        plain_to_pipe_key("decoder.weight", config)


def test_alibi_slopes_are_press_et_al():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    twelve = alibi_slopes(12).tolist()
    assert twelve[:8] == [2.0 ** -i for i in range(1, 9)]
    assert twelve[8:] == pytest.approx([2.0 ** -(i - 0.5) for i in range(1, 5)])


def test_llama3_rope_scaling():
    config = dataclasses.replace(model_preset("llama-1b"), num_layers=1)
    base = rope_inv_freq(dataclasses.replace(config, use_rope_scaling=False)).double()
    scaled = rope_inv_freq(config).double()
    wavelen = 2 * math.pi / base
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert torch.allclose(scaled[high], base[high])
    assert torch.allclose(scaled[low], base[low] / 32)
    mid = ~(high | low)
    assert mid.any() and ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 32)).all()
    assert torch.all(scaled[1:] <= scaled[:-1])  # still monotone: no frequency jumps


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=100, num_attention_heads=12), "model.hidden_size=100 is not divisible by model.num_attention_heads=12"),
    (dict(num_attention_heads=12, num_query_groups=5), "model.num_attention_heads=12 is not divisible by model.num_query_groups=5"),
    (dict(position_embedding_type="sinusoidal"), "model.position_embedding_type='sinusoidal' is not one of"),
    (dict(normalization="BatchNorm"), "model.normalization"),
    (dict(hidden_dropout=1.0), "model.hidden_dropout=1.0 must be in"),
    (dict(num_layers=0), "model.num_layers=0 must be >= 1"),
    (dict(position_embedding_type="rope", hidden_size=96, num_attention_heads=16, rotary_percent=0.5),
     "model.rotary_percent=0.5 gives an odd number"),
    (dict(use_rope_scaling=True, rope_low_freq_factor=4.0, rope_high_freq_factor=1.0), "model.rope_scaling_factor"),
])
def test_model_config_errors_name_the_field(kwargs, match):
    with pytest.raises(UserError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("model_kwargs,tp,pp,method,match", [
    (dict(num_attention_heads=12), 5, 1, "parameters", "num_attention_heads=12 is not divisible by "
                                                            "parallel.tensor_model_parallel_size=5"),
    (dict(num_attention_heads=8, num_query_groups=2), 4, 1, "parameters", "model.num_query_groups=2 is not "
                                                                               "divisible"),
    (dict(num_attention_heads=12, ffn_hidden_size=1000), 3, 1, "parameters", "model.ffn_hidden_size=1000"),
    (dict(num_layers=2), 1, 4, "parameters", "model.num_layers=2 cannot be split across"),
    (dict(num_layers=6), 1, 4, "uniform", "model.num_layers=6 is not divisible by "
                                                 "parallel.pipeline_model_parallel_size=4"),
])
def test_parallel_shape_errors(model_kwargs, tp, pp, method, match):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              pipeline_partition_method=method)
    with pytest.raises(UserError, match=match):
        check_parallel_shapes(ModelConfig(**model_kwargs), parallel)
    with pytest.raises(UserError, match=match):  # what the tools that lay out a stored model run
        validate_layout(ModelConfig(**model_kwargs), parallel)


def test_a_loaded_vocabulary_must_split_into_equal_shards():
    with pytest.raises(UserError, match=r"padded vocabulary size 50257 \(from ckpt\) is not divisible by "
                                        "parallel.tensor_model_parallel_size=2"):
        check_vocab(50257, 50257, "ckpt", 2)
    with pytest.raises(UserError, match="padded vocabulary size 129 .* not divisible"):
        validate_layout(ModelConfig(), ParallelConfig(tensor_model_parallel_size=2), 129, "the state dict")
    check_vocab(50257, 50304, "ckpt", 2)
    validate_layout(ModelConfig(), ParallelConfig(tensor_model_parallel_size=2), 130, "the state dict")


def test_parallel_shapes_that_fit_pass():
    check_parallel_shapes(model_preset("llama-7b"), ParallelConfig(tensor_model_parallel_size=8,
                                                                   pipeline_model_parallel_size=4))
    check_parallel_shapes(ModelConfig(num_layers=6), ParallelConfig(pipeline_model_parallel_size=4))


def test_gpt_model_is_one_pipeline_stage():
    # Shapes were checked at validation (megaclm.config.validate); the model refuses only a pipeline layout.
    config = family_config("gpt2", num_attention_heads=4)
    with pytest.raises(ValueError, match="GPTPipelineModule"):
        GPTModel(config, 128, ParallelState(2, 0, pipeline_parallel_size=2))


def test_document_offsets_flatten_documents_and_rows():
    from megaclm.model.attention import document_offsets

    ids = torch.tensor([[0, 0, 1, 1, 1], [3, 3, 3, 3, 3], [0, 1, 2, 2, 0]])
    cu, longest = document_offsets(ids)
    # a row boundary always starts a document, even with equal ids on both sides
    assert cu.tolist() == [0, 2, 5, 10, 11, 12, 14, 15] and cu.dtype == torch.int32 and longest == 5
