"""Write a tiny randomly initialised Hugging Face causal LM (+ GPT-2 BPE tokenizer files) to a directory.

For tests and the offline continual-pretraining example: no hub, the shapes are built from a config here.

    python tools/checkpoint/tiny_hf_model.py --family llama --out /tmp/tiny-llama

Families and what each exercises in the converter:
    gpt2     learned positions, LayerNorm, GELU (tanh), fused Conv1D qkv, biases, tied embeddings
    llama    RoPE with Llama-3 scaling, RMSNorm, SwiGLU, grouped-query attention, untied embeddings
    mistral  as llama, default RoPE, a 16-token sliding window (shorter than the test sequences)
    qwen2    as llama, qkv bias, tied embeddings
    mixtral  as mistral without a window, 4 experts, top-2 (renormalised)
    qwen2_moe as qwen2 untied, 4 experts of 48, top-2 of the softmax (not renormalised), a gated shared expert
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from megaclm.utils.errors import UserError, cli_main  # noqa: E402

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
EOD = "<|endoftext|>"


def tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2, init_std: float = 0.02) -> dict:
    """config.json contents of a tiny model of `family` (4 heads, 2 query groups where GQA applies)."""
    if family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_size, n_embd=hidden,
                    n_layer=layers, n_head=4, n_positions=256, activation_function="gelu_new",
                    initializer_range=init_std, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden // 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  initializer_range=init_std, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return dict(common, model_type="llama", architectures=["LlamaForCausalLM"], rope_parameters=rope,
                    tie_word_embeddings=False)
    if family == "mistral":
        return dict(common, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False)
    if family == "qwen2":
        return dict(common, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False)
    if family == "mixtral":
        return dict(common, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                    num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=None, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen2_moe":
        return dict(common, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=hidden * 2,
                    norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    raise UserError(f"--family {family!r} is not one of {', '.join(FAMILIES)}")


def write_gpt2_tokenizer(out: str, vocab_file: str, merges_file: str) -> None:
    """A tokenizer.json + tokenizer_config.json that AutoTokenizer loads (GPT-2 byte-level BPE)."""
    from tokenizers.implementations import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(vocab_file, merges_file)
    bpe.add_special_tokens([EOD])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOD, eos_token=EOD, unk_token=EOD)
    tok.save_pretrained(out)


def make_tiny_model(family: str, out: str, seed: int = 0, init_std: float = 0.02, hidden: int = 64, layers: int = 2,
                    vocab_file: str | None = None, merges_file: str | None = None) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab_file = vocab_file or os.path.join(REPO, "tests", "data", "gpt2-vocab.json")
    merges_file = merges_file or os.path.join(REPO, "tests", "data", "gpt2-merges.txt")
    for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merges_file)):
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
    with open(vocab_file, encoding="utf-8") as f:
        vocab_size = len(json.load(f))
    cfg = tiny_config(family, vocab_size, hidden, layers, init_std)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    if init_std != 0.02:
        # HF zeroes no weights for these families but initialises norms to 1 and biases to 0; randomise
        # those too so a converter that drops a bias or a norm weight changes the logits.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * init_std)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    write_gpt2_tokenizer(out, vocab_file, merges_file)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True, help="Directory to write the model and tokenizer to.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.02,
                   help="Std of the random weights; != 0.02 also perturbs norm weights and biases.")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (default: tests/data/gpt2-vocab.json).")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (default: tests/data/gpt2-merges.txt).")
    a = p.parse_args()
    make_tiny_model(a.family, a.out, a.seed, a.init_std, a.hidden_size, a.num_layers, a.vocab_file, a.merge_file)
    print(f"wrote a tiny {a.family} model to {a.out}")


if __name__ == "__main__":
    cli_main(main)
