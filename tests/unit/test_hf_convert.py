"""Pure HF <-> megaclm conversion (megaclm.checkpoint.hf) and eval_perplexity's windowing rule, in-process.

Each family's tiny random HF model (tools/checkpoint/tiny_hf_model.py, norms and biases perturbed so a
dropped or misplaced one shows) is converted with from_hf and run as megaclm's GPTModel: its logits must
equal transformers' (fp32). to_hf must give back the HF tensors exactly. Bad configs and weights must
raise one UserError naming the problem.
"""
import dataclasses
import importlib.util
import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from megaclm.checkpoint.hf.llama import MOE_FAMILIES  # noqa: E402
from megaclm.checkpoint.hf import FAMILIES, config_from_hf, from_hf, infer_family, pad_vocab, to_hf, unpad_vocab  # noqa: E402
from megaclm.model.gpt import GPTModel  # noqa: E402
from megaclm.utils.errors import UserError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tool(rel: str):
    spec = importlib.util.spec_from_file_location(pathlib.Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _tool("tools/checkpoint/tiny_hf_model.py")
eval_ppl = _tool("tools/eval_perplexity.py")
VOCAB = 300  # a small vocabulary: the converter does not care what the ids mean


def _hf_model(family: str, **overrides):
    cfg = {**tiny.tiny_config(family, VOCAB, hidden=32, layers=2, init_std=0.1), **overrides}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg),
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms start at 1 and biases at 0: perturb them so each one matters
                p.add_(torch.randn_like(p) * 0.1)
    return model, cfg


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, cfg = _hf_model(request.param)
    return request.param, model, cfg


def test_from_hf_logits_equal_transformers(family_model):
    family, hf, cfg = family_model
    model_cfg, sd = from_hf(hf.state_dict(), cfg)
    assert infer_family(model_cfg) == family
    padded = 384  # Megatron padding: extra zero rows the converter adds, never seen by the real vocabulary
    model = GPTModel(model_cfg, padded).eval()
    model.load_state_dict(pad_vocab(sd, padded))
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[..., :VOCAB], hf(ids).logits
    assert theirs.std() > 0.3  # the check below is not trivially satisfied by near-zero logits
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_to_hf_returns_the_hf_tensors(family_model):
    family, hf, cfg = family_model
    model_cfg, sd = from_hf(hf.state_dict(), cfg)
    hf_cfg, hf_sd = to_hf(model_cfg, pad_vocab(sd, 512), vocab_size=VOCAB)
    if family in MOE_FAMILIES:  # exported as the published per-expert files (transformers fuses them on load)
        assert any(".experts.3." in k for k in hf_sd) and not any("gate_up_proj" in k for k in hf_sd)
        _, again = from_hf(hf_sd, hf_cfg)
        assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
        assert config_from_hf(transformers.AutoConfig.for_model(**hf_cfg)) == model_cfg
        return
    expected = {k: v for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and hf_cfg["tie_word_embeddings"])}
    assert sorted(hf_sd) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(hf_sd[key], value), key
    rebuilt = transformers.AutoConfig.for_model(**hf_cfg)
    assert config_from_hf(rebuilt) == model_cfg  # the config survives the round trip through transformers


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])  # the folding does not depend on the MLP kind
def test_layernorm_1p_is_folded_into_the_exported_norm_weights(family):
    """A zero-centred-norm model (--apply-layernorm-1p) exports to HF norms that scale by 1 + w: equal logits."""
    hf, cfg = _hf_model(family)
    model_cfg, sd = from_hf(hf.state_dict(), cfg)
    one_p = dataclasses.replace(model_cfg, apply_layernorm_1p=True)
    sd = {k: v - 1 if k.endswith("norm.weight") else v for k, v in sd.items()}  # the same model, stored as w - 1
    model = GPTModel(one_p, VOCAB).eval()
    model.load_state_dict(sd)
    hf_cfg, hf_sd = to_hf(one_p, sd, vocab_size=VOCAB)
    back = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_cfg)).eval()
    back.load_state_dict(hf_sd, strict=False)
    if hf_cfg.get("tie_word_embeddings"):
        back.tie_weights()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), back(ids).logits, atol=2e-5, rtol=0)
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=2e-5, rtol=0)


def test_llama3_rope_scaling_is_converted():
    _, cfg = _hf_model("llama")
    model_cfg = config_from_hf(cfg)
    assert model_cfg.use_rope_scaling and model_cfg.rope_scaling_factor == 8.0
    assert model_cfg.rope_original_max_position_embeddings == 32 and model_cfg.rotary_base == 500000.0
    # The 4.x spelling (rope_theta + rope_scaling with "type") means the same.
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    assert config_from_hf(old) == model_cfg


def test_vocab_padding_round_trip():
    sd = {"embedding.word_embeddings.weight": torch.randn(5, 3), "output_layer.weight": torch.randn(5, 3),
          "final_norm.weight": torch.ones(3)}
    padded = pad_vocab(sd, 8)
    assert padded["embedding.word_embeddings.weight"].shape == (8, 3)
    assert padded["output_layer.weight"][5:].abs().sum() == 0
    back = unpad_vocab(padded, 5)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(UserError, match="more than the padded vocabulary"):
        pad_vocab(sd, 4)


@pytest.mark.parametrize("family, overrides, message", [
    ("gpt2", {"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "unsupported architecture"),
    ("gpt2", {"activation_function": "relu"}, "activation_function='relu' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"attention_bias": True, "mlp_bias": False}, "attention_bias=True and mlp_bias=False"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "mixes windowed"),
    ("llama", {"hidden_size": None}, "has no 'hidden_size'"),
])
def test_unsupported_configs_are_refused(family, overrides, message):
    _, cfg = _hf_model(family)
    with pytest.raises(UserError, match=message):
        config_from_hf({**cfg, **overrides})


def test_bad_weights_are_refused():
    hf, cfg = _hf_model("qwen2")
    sd = dict(hf.state_dict())
    with pytest.raises(UserError, match="not understood by the converter"):
        from_hf({**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}, cfg)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(UserError, match="no 'layers.1.self_attn.k_proj.bias'"):
        from_hf(missing, cfg)
    with pytest.raises(UserError, match="has shape"):
        from_hf({**sd, "model.norm.weight": torch.ones(31)}, cfg)
    with pytest.raises(UserError, match="vocab_size=301"):
        from_hf(sd, {**cfg, "vocab_size": 301})


def test_export_refuses_a_family_that_cannot_express_the_model():
    hf, cfg = _hf_model("llama")
    model_cfg, sd = from_hf(hf.state_dict(), cfg)
    with pytest.raises(UserError, match="cannot be exported as GPT-2"):
        to_hf(model_cfg, sd, family="gpt2")
    with pytest.raises(UserError, match="cannot be exported as qwen2"):
        to_hf(model_cfg, sd, family="qwen2")
    windowed = dataclasses.replace(model_cfg, window_size=16)
    assert infer_family(windowed) == "mistral"


def test_windows_follow_the_rule():
    # The README's example: stream 1 2 3 0 4 5 0, windows of S+1 = 3 from position 0, tail [0] dropped.
    assert eval_ppl.make_windows([[1, 2, 3], [4, 5]], eod=0, seq_length=2).tolist() == [[1, 2, 3], [0, 4, 5]]
    w = eval_ppl.make_windows([[1, 2, 3], [4, 5], [6]], eod=0, seq_length=2)  # 9 tokens: exactly 3 windows
    assert w.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    w = eval_ppl.make_windows([[1, 2, 3], [4, 5], [6, 7]], eod=0, seq_length=3)
    assert w.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]  # incomplete tail [7, 0] dropped
    assert eval_ppl.make_windows([[1, 2, 3], [4, 5], [6]], eod=0, seq_length=2, max_windows=1).tolist() == [[1, 2, 3]]
    with pytest.raises(UserError, match="fewer than one window"):
        eval_ppl.make_windows([[1, 2]], eod=0, seq_length=8)
