"""tools/train_tokenizer.py: both kinds train on real text and load through build_tokenizer."""
import importlib.util
import json
import pathlib

import pytest

from megaclm.tokenizer import build_tokenizer
from megaclm.utils.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("megaclm_tool_train_tok", ROOT / "tools" / "train_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SAMPLE = "To be, or not to be, that is the question: <|endoftext|> </s> café ünïcödé"


def test_byte_level_bpe(tool, tmp_path):
    out = tmp_path / "bpe"
    assert tool.main(["--input", str(DATA / "hamlet.txt"), str(DATA / "wiki_summaries_500.jsonl"),
                      "--type", "bpe", "--vocab-size", "600", "--output-dir", str(out)]) == 0
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(out))
    assert tok.vocab_size == 600 and tok.eod == 0  # <|endoftext|> reserved first
    ids = tok.tokenize(SAMPLE)
    assert tok.detokenize(ids) == SAMPLE and tok.eod not in ids  # byte level: lossless, eod only by choice
    hamlet = (DATA / "hamlet.txt").read_text("utf-8")[:5000]
    assert len(tok.tokenize(hamlet)) < 0.6 * len(hamlet.encode())  # merges were learned (bytes alone: 1.0)
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_unigram(tool, tmp_path):
    import sentencepiece as spm

    out = tmp_path / "uni"
    assert tool.main(["--input", str(DATA / "hamlet.txt"), "--type", "unigram", "--vocab-size", "400",
                      "--output-dir", str(out)]) == 0
    model = str(out / "tokenizer.model")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    ref = spm.SentencePieceProcessor(model_file=model)
    assert tok.vocab_size == 400 and tok.eod == ref.eos_id() == 2
    assert tok.tokenize(SAMPLE) == ref.encode(SAMPLE)
    assert tok.detokenize(tok.tokenize("To be, or not to be")) == "To be, or not to be"


def test_errors(tool, tmp_path):
    with pytest.raises(UserError, match="at least 257"):
        tool.main(["--input", str(DATA / "hamlet.txt"), "--vocab-size", "100", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(UserError, match="sentencepiece training failed"):
        tool.main(["--input", str(DATA / "hamlet.txt"), "--type", "unigram", "--vocab-size", "100000",
                   "--output-dir", str(tmp_path / "y")])
    assert not (tmp_path / "y" / "tokenizer.model").exists()
    with pytest.raises(UserError, match="no such file"):
        tool.main(["--input", str(tmp_path / "none.jsonl"), "--vocab-size", "300", "--output-dir", str(tmp_path / "z")])


def test_json_keys_spelling_of_preprocess_data_is_accepted(tool, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"body": f"line {i} of text"}) + "\n" for i in range(50)))
    assert tool.main(["--input", str(tmp_path / "in.jsonl"), "--json-keys", "body", "--vocab-size", "300",
                      "--output-dir", str(tmp_path / "t")]) == 0
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "t"))
    assert len(tok.tokenize(" of text")) < len(" of text")  # merges learned from the "body" values


def test_out_spelling_of_the_other_tools_is_accepted(tool, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(50)))
    assert tool.main(["--input", str(tmp_path / "in.jsonl"), "--json-key", "text", "--vocab-size", "300",
                      "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "tokenizer.json").is_file()
