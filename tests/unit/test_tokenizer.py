"""Tokenizers against independent references on real text (hamlet + Wikipedia summaries)."""
import json
import pathlib

import numpy as np
import pytest
import sentencepiece as spm

from megaclm.config.tokenizer import TokenizerConfig
from megaclm.config.derived import pad_vocab_size
from megaclm.tokenizer import build_tokenizer, build_tokenizer_from_config
from megaclm.utils.errors import UserError

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
VOCAB, MERGES, SP_MODEL = str(DATA / "gpt2-vocab.json"), str(DATA / "gpt2-merges.txt"), str(DATA / "sp_test_model.model")


def real_texts() -> list[str]:
    wiki = [json.loads(line)["text"] for line in (DATA / "wiki_summaries_500.jsonl").read_text("utf-8").splitlines()]
    hamlet = (DATA / "hamlet.txt").read_text("utf-8")
    # Hamlet whole, and in scene-sized pieces (whitespace runs at the edges matter to BPE).
    return wiki + [hamlet] + hamlet.split("\n\n\n")


@pytest.fixture(scope="module")
def texts():
    return real_texts()


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)


@pytest.fixture(scope="module")
def gpt2_hf_engine():
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    tok.__dict__["_fast"] = None  # force the HF tokenizers engine
    return tok


@pytest.fixture(scope="module")
def reference_gpt2():
    from transformers import GPT2TokenizerFast

    vocab = json.loads(pathlib.Path(VOCAB).read_text("utf-8"))
    merges = [tuple(m.split()) for m in pathlib.Path(MERGES).read_text("utf-8").split("\n")[1:] if m]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def test_gpt2_hello_world_and_sizes(gpt2):
    assert gpt2.engine == "tiktoken"
    assert gpt2.tokenize("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.eod, gpt2.padded_vocab_size) == (50257, 50256, 50304)


@pytest.mark.parametrize("engine", ["gpt2", "gpt2_hf_engine"])
def test_gpt2_equals_transformers_on_real_text(engine, request, texts, reference_gpt2):
    tok = request.getfixturevalue(engine)
    expected = [reference_gpt2(t)["input_ids"] for t in texts]
    assert tok.tokenize_batch(texts) == expected
    assert [tok.tokenize(t) for t in texts[:50]] == expected[:50]
    flat, lengths = tok.tokenize_batch_flat(texts, np.uint16)
    assert flat.dtype == np.uint16 and lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]
    assert sum(map(len, expected)) > 100_000  # the comparison covered real volume
    assert tok.detokenize(expected[500]) == texts[500]  # Hamlet round trip


@pytest.mark.parametrize("engine", ["gpt2", "gpt2_hf_engine"])
def test_gpt2_special_strings_are_plain_text(engine, request):
    tok = request.getfixturevalue(engine)
    ids = tok.tokenize("end<|endoftext|>start")
    assert tok.eod not in ids and tok.detokenize(ids) == "end<|endoftext|>start"
    assert tok.tokenize("a\ud800b") == [64, 4210, 65]  # a lone surrogate (valid JSON) becomes U+FFFD


def test_gpt2_other_vocab_files_use_the_hf_engine(tmp_path, gpt2, texts):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(json.loads(pathlib.Path(VOCAB).read_text("utf-8")), indent=1))  # same ids, new bytes
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=MERGES)
    assert tok.engine == "tokenizers"
    assert tok.tokenize_batch(texts[:100]) == gpt2.tokenize_batch(texts[:100])


def test_sentencepiece_equals_sentencepiece_without_bos_eos(texts):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    ref = spm.SentencePieceProcessor(model_file=SP_MODEL)
    expected = [ref.encode(t) for t in texts]
    assert tok.tokenize_batch(texts) == expected
    assert tok.tokenize(texts[0]) == expected[0]
    flat, lengths = tok.tokenize_batch_flat(texts[:3], np.int32)
    assert flat.tolist() == [i for e in expected[:3] for i in e] and lengths.tolist() == [len(e) for e in expected[:3]]
    assert all(ref.bos_id() not in e and ref.eos_id() not in e for e in expected[:100])
    assert (tok.vocab_size, tok.eod, tok.padded_vocab_size) == (1000, 2, 1024)
    assert tok.eod not in tok.tokenize("a </s> b")
    assert tok.tokenize("a\ud800b") == tok.tokenize_batch(["a\ud800b"])[0] == ref.encode("a\ufffdb")
    assert tok.detokenize(expected[0]) == ref.decode(expected[0])


def test_huggingface_dir_and_json(tmp_path, gpt2, texts):
    from tokenizers import AddedToken, Tokenizer

    hf = Tokenizer.from_str(gpt2._hf.to_str())
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    d = tmp_path / "tok"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    for path in (str(d), str(d / "tokenizer.json")):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)
        assert tok.tokenize_batch(texts[:100]) == gpt2.tokenize_batch(texts[:100])
        assert tok.eod == 50256 and tok.vocab_size == 50257
        assert tok.eod not in tok.tokenize("x<|endoftext|>y")  # a special token in the text is text
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "!"}}))
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d)).eod == 0
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(UserError, match="<nope>"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d))


def test_huggingface_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bad))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(bad))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bad))
    with pytest.raises(UserError, match="no end-of-document token"):
        tok.eod


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.tokenize(" 5 0  99\n7") == [5, 0, 99, 7]
    assert tok.tokenize_batch(["1 2", ""]) == [[1, 2], []]
    assert tok.detokenize([5, 0]) == "5 0"
    assert (tok.vocab_size, tok.eod, tok.padded_vocab_size) == (101, 100, 128)
    with pytest.raises(UserError, match="outside"):
        tok.tokenize("1 100")
    with pytest.raises(UserError, match="integers"):
        tok.tokenize("1 two")
    with pytest.raises(UserError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_padded_vocab_math():
    assert pad_vocab_size(50257, 128, 1) == 50304
    assert pad_vocab_size(50257, 128, 2) == 50432
    assert pad_vocab_size(50304, 128, 1) == 50304
    assert pad_vocab_size(32000, 64, 8) == 32256
    assert pad_vocab_size(7, 1, 1) == 7
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES,
                          make_vocab_size_divisible_by=64, tensor_model_parallel_size=4)
    assert tok.padded_vocab_size == 50432
    with pytest.raises(UserError, match="make_vocab_size_divisible_by"):
        pad_vocab_size(10, 0, 1)


def test_build_errors_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--tokenizer-type 'GPT3'"):
        build_tokenizer("GPT3")
    with pytest.raises(UserError, match="--vocab-file is required"):
        build_tokenizer("GPT2BPETokenizer", merge_file=MERGES)
    with pytest.raises(UserError, match=f"--merge-file {tmp_path}/m.txt: no such file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=str(tmp_path / "m.txt"))
    with pytest.raises(UserError, match="--tokenizer-model .*no such file"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "x.model"))
    (tmp_path / "x.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "x.model"))
    (tmp_path / "v.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="cannot read GPT-2 BPE files"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "v.json"), merge_file=MERGES)


def test_tokenizer_config():
    cfg = TokenizerConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    tok = build_tokenizer_from_config(cfg, tensor_model_parallel_size=2)
    assert tok.padded_vocab_size == 50432 and tok.tokenize("Hello world") == [15496, 995]
    assert TokenizerConfig().tokenizer_type is None  # a default tree needs no tokenizer
    with pytest.raises(UserError, match="tokenizer.tokenizer_type is not set"):
        build_tokenizer_from_config(TokenizerConfig())
    with pytest.raises(UserError, match="tokenizer.merge_file is required"):
        TokenizerConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=VOCAB)
    with pytest.raises(UserError, match="tokenizer.tokenizer_type='BPE' is unknown"):
        TokenizerConfig(tokenizer_type="BPE")
    with pytest.raises(UserError, match="tokenizer.make_vocab_size_divisible_by=0"):
        TokenizerConfig(make_vocab_size_divisible_by=0)
    with pytest.raises(UserError, match="tokenizer.vocab_size is required"):
        TokenizerConfig(tokenizer_type="NullTokenizer")


# Words, spaces and punctuation: there GPT-2's split pattern and Llama-3's cut the same pieces, so a
# Llama-3 tokenizer.model holding GPT-2's ranks must give GPT-2's ids (megaclm's GPT-2 BPE is checked
# against transformers above).
PLAIN = ["The quick brown fox jumps over the lazy dog, again and again.", "Don't stop: it's fine!",
         "Hello world"]


def test_llama2_tokenizer_is_sentencepiece_with_bos(texts):
    tok = build_tokenizer("Llama2Tokenizer", tokenizer_model=SP_MODEL)
    ref = spm.SentencePieceProcessor(model_file=SP_MODEL)
    assert tok.tokenize_batch(texts[:20]) == [[ref.bos_id()] + ref.encode(t) for t in texts[:20]]
    assert tok.tokenize(texts[0]) == [ref.bos_id()] + ref.encode(texts[0])
    assert (tok.vocab_size, tok.eod, tok.bos) == (1000, ref.eos_id(), 1)


def test_llama3_tokenizer_reads_meta_format(tmp_path, gpt2):
    from data_testutils import write_llama3_model

    path = write_llama3_model(str(tmp_path / "tokenizer.model"), VOCAB)
    tok = build_tokenizer("Llama3Tokenizer", tokenizer_model=path)
    base = 50256  # GPT-2's ranks without <|endoftext|>
    assert (tok.vocab_size, tok.bos, tok.eod) == (base + 256, base, base + 1)
    assert tok.tokenize_batch(PLAIN) == [[base] + gpt2.tokenize(t) for t in PLAIN]
    assert tok.detokenize(tok.tokenize(PLAIN[0])[1:]) == PLAIN[0]
    assert tok.tokenize("<|end_of_text|>")[1:] == gpt2.tokenize("<|end_of_text|>")  # plain text, not eod
    (tmp_path / "bad.model").write_text("not base64 at all\n")
    with pytest.raises(UserError, match=r"bad.model: line 1 is not `base64-token rank`"):
        build_tokenizer("Llama3Tokenizer", tokenizer_model=str(tmp_path / "bad.model"))


def test_tiktokenizer_is_megatrons_custom_tiktoken(tmp_path, gpt2):
    from data_testutils import write_tiktoken_json

    path = write_tiktoken_json(str(tmp_path / "vocab.json"), VOCAB)
    tok = build_tokenizer("TikTokenizer", tokenizer_model=path, vocab_size=1000 + 50256, tiktoken_pattern="v1")
    assert (tok.vocab_size, tok.bos, tok.eod) == (51256, 1, 2)  # <unk> <s> </s> first, fillers to 1000
    assert tok.tokenize_batch(["Hello world"]) == [[1000 + i for i in gpt2.tokenize("Hello world")]]
    small = build_tokenizer("TikTokenizer", tokenizer_model=path, vocab_size=1300, tiktoken_num_special_tokens=100)
    assert small.vocab_size == 1300 and max(small.tokenize(PLAIN[0])) < 1300  # ranks cut to fit
    with pytest.raises(UserError, match="fewer than --vocab-size"):
        build_tokenizer("TikTokenizer", tokenizer_model=path, vocab_size=2 ** 17)
    with pytest.raises(UserError, match="must be unique and include <unk>, <s>, </s>"):
        build_tokenizer("TikTokenizer", tokenizer_model=path, vocab_size=1300, tiktoken_special_tokens=["<s>"])
