"""Every flag of megaclm.config.megatron_compat.TABLE does what its fate says, checked against the native
flags it stands for (written out here, independently of the table), plus the README section it generates."""
import re
from pathlib import Path

import pytest

from megaclm.config import build_parser, megatron_compat, parse_args, parse_config
from megaclm.config.megatron_compat import ALIAS, IGNORED, REFUSED, TABLE, translate
from megaclm.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--max-position-embeddings", "64"]
RUN = ["--seq-length", "32", "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
       "--mock-data"]
BASE = SHAPE + RUN + ["--train-iters", "4"]

# What each alias means, in native flags (kept by hand: a new alias needs an entry here).
ALIASES = {
    ("--use-rotary-position-embeddings",): ["--position-embedding-type", "rope"],
    ("--no-position-embedding",): ["--position-embedding-type", "none"],
    ("--no-position-embedding", "--use-rotary-position-embeddings"): ["--position-embedding-type", "rope"],
    ("--group-query-attention", "--num-query-groups", "2"): ["--num-query-groups", "2"],
    ("--num-key-value-heads", "2"): ["--num-query-groups", "2"],
    ("--num-key-value-heads=2",): ["--num-query-groups", "2"],
    ("--layernorm-epsilon", "1e-6"): ["--norm-epsilon", "1e-6"],
    ("--rope-theta", "500000"): ["--rotary-base", "500000"],
    ("--use-rope-scaling-llama3",): ["--use-rope-scaling"],
    ("--use-flash-attn",): ["--attention-backend", "flash"],
    ("--use-flash-attn-v2",): ["--attention-backend", "flash"],
    ("--use-flash-attn-triton",): ["--attention-backend", "flash"],
    ("--recompute-activations",): ["--recompute-granularity", "selective"],
    ("--checkpoint-activations",): ["--recompute-granularity", "full", "--recompute-method", "uniform"],
    ("--checkpoint-activations", "--recompute-method", "block"): ["--recompute-granularity", "full",
                                                                   "--recompute-method", "block"],
    ("--checkpoint-num-layers", "2"): ["--recompute-num-layers", "2"],
    ("--use-distributed-optimizer",): ["--zero-stage", "1"],
    ("--use-distributed-optimizer", "--zero-stage", "2"): ["--zero-stage", "2"],
    ("--no-pipeline-parallel",): ["--pipeline-model-parallel-size", "1"],
    ("--cpu-optimizer",): ["--offload-optimizer"],
    ("--exit-signal-handler",): [],  # always on: the config is the default one
    ("--num-experts", "4", "--topk", "2"): ["--num-experts", "4", "--moe-router-topk", "2"],
    ("--num-experts", "4", "--moe-loss-coeff", "0.1"): ["--num-experts", "4", "--moe-aux-loss-coeff", "0.1"],
    ("--num-experts", "4", "--moe-train-capacity-factor", "1.5"): ["--num-experts", "4",
                                                                  "--moe-expert-capacity-factor", "1.5"],
    ("--num-experts", "4", "--moe-expert-parallel-size", "1"): ["--num-experts", "4",
                                                                "--expert-model-parallel-size", "1"],
    ("--normalization", "rmsnorm"): ["--normalization", "RMSNorm"],
    ("--normalization", "layernorm"): ["--normalization", "LayerNorm"],
    ("--attention-backend", "fused"): ["--attention-backend", "sdpa"],
    ("--attention-backend", "local"): ["--attention-backend", "unfused"],
    ("--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(ROOT / "tests/data/sp_test_model.model")):
        ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(ROOT / "tests/data/sp_test_model.model")],
}


def config(extra):
    cfg, derived = parse_config(BASE + list(extra))
    return cfg.to_dict(), derived


@pytest.mark.parametrize("megatron, native", list(ALIASES.items()), ids=lambda x: " ".join(x) if isinstance(x, tuple) else None)
def test_alias_equals_its_native_flags(megatron, native):
    assert config(megatron) == config(native)


def test_every_alias_has_an_independent_expectation():
    covered = {tok.partition("=")[0] for key in ALIASES for tok in key if tok.startswith("--")}
    missing = [c.flag for c in TABLE if c.fate == ALIAS and c.flag not in covered]
    assert missing == []


def _with_value(c):
    return [c.flag] + ([c.only[0] if c.only else "1"] * c.nargs)


@pytest.mark.parametrize("c", [c for c in TABLE if c.fate == IGNORED], ids=lambda c: c.flag)
def test_ignored_flag_changes_nothing_and_says_why(c):
    argv = _with_value(c)
    assert config(argv) == config([])
    native, notes = translate(BASE + argv)
    assert native == BASE
    assert len(notes) == 1 and notes[0].startswith(f"ignoring {' '.join(argv)}: ") and c.why in notes[0]


@pytest.mark.parametrize("c", [c for c in TABLE if c.fate == REFUSED or c.only], ids=lambda c: c.flag)
def test_refused_flag_is_one_error_naming_it_and_the_alternative(c):
    argv = [c.flag] + ["2"] * c.nargs  # "2" is outside every `only`
    with pytest.raises(UserError) as e:
        parse_config(BASE + argv)
    assert str(e.value) == f"{' '.join(argv)} is not supported: {c.why}"


def test_several_refused_flags_are_named_in_one_error():
    with pytest.raises(UserError) as e:
        translate(["--rampup-batch-size", "16", "16", "100", "--data-impl", "lazy"])
    assert "--rampup-batch-size 16 16 100" in str(e.value) and "--data-impl lazy" in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--use-flash-attn", "--attention-backend", "unfused"],
     "--use-flash-attn means --attention-backend flash, but --attention-backend unfused was also given"),
    (["--recompute-activations", "--checkpoint-activations"], "contradict each other (--recompute-granularity)"),
    (["--no-pipeline-parallel", "--pipeline-model-parallel-size", "2"], "--no-pipeline-parallel means"),
    (["--group-query-attention"], "--group-query-attention needs --num-query-groups"),
    (["--num-key-value-heads"], "--num-key-value-heads expects 1 value(s), got 0"),
])
def test_contradictions_are_errors(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_config(BASE + argv)


def test_a_megatron_flag_that_is_not_in_the_table_still_gets_argparse_error():
    with pytest.raises(UserError, match="unrecognized arguments: --no-such-flag"):
        parse_config(BASE + ["--no-such-flag"])


def test_table_and_native_flags_do_not_overlap():
    native = {s for a in build_parser()._actions for s in a.option_strings}
    assert [c.flag for c in TABLE if c.flag in native] == []
    assert len({c.flag for c in TABLE}) == len(TABLE)
    targets = {t for c in TABLE for t in (*c.to, *c.weak, c.requires or "") if t.startswith("--")}
    assert targets - native == set()
    assert set(megatron_compat.VALUE_ALIASES) <= native


def test_value_aliases_reach_only_their_flag():
    native, _ = translate(["--data-path", "rmsnorm", "--normalization", "rmsnorm"])
    assert native == ["--data-path", "rmsnorm", "--normalization", "RMSNorm"]


def test_readme_section_is_generated_from_the_table():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- megatron-compat:start -->\n", "<!-- megatron-compat:end -->"
    assert start in readme and end in readme, "README lost its generated Megatron flag section"
    body = readme.split(start)[1].split(end)[0]
    assert body.strip() == megatron_compat.markdown_table().strip(), \
        "README's Megatron flag table is stale: regenerate it with python -m megaclm.config.megatron_compat"


def test_parse_args_logs_nothing_for_native_flags_and_keeps_the_namespace():
    _, _, ns = parse_args(BASE + ["--use-flash-attn"])
    assert ns.validate_only is False


def test_use_checkpoint_args_takes_the_model_from_the_checkpoint(tmp_path):
    stored = config(["--num-layers", "3", "--hidden-size", "32", "--normalization", "RMSNorm"])[0]
    load = ["--load", str(tmp_path)]
    shape = ["--num-attention-heads", "4", "--max-position-embeddings", "64"] + RUN + ["--train-iters", "4"]
    args = shape + load + ["--use-checkpoint-args"]
    cfg, _, _ = parse_args(args, stored_config=lambda d, step: stored)
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 32 and cfg.model.normalization == "RMSNorm"
    cfg, _, _ = parse_args(args + ["--num-layers", "3", "--recompute-granularity", "full"],
                           stored_config=lambda d, step: stored)
    assert cfg.model.recompute_granularity == "full"  # a run choice, not the checkpoint's shape
    with pytest.raises(UserError, match=r"change the parameter shapes .*--num-layers 4 \(checkpoint: 3\)"):
        parse_args(args + ["--num-layers", "4"], stored_config=lambda d, step: stored)
    # not a shape of the checkpoint (learned positions are not in it): the flag wins, as in Megatron-LM
    rope = dict(stored, model=dict(stored["model"], position_embedding_type="rope", max_position_embeddings=32))
    cfg, _, _ = parse_args(args, stored_config=lambda d, step: rope)
    assert (cfg.model.position_embedding_type, cfg.model.max_position_embeddings) == ("rope", 64)
    with pytest.raises(UserError, match=r"--max-position-embeddings 64 \(checkpoint: 32\)"):
        parse_args(args, stored_config=lambda d, step: dict(rope, model=dict(rope["model"],
                                                                      position_embedding_type="learned_absolute")))
    with pytest.raises(UserError, match="no checkpoint in --load"):
        parse_args(args, stored_config=lambda d, step: None)
    with pytest.raises(UserError, match="needs checkpoint.load|needs --load DIR"):
        parse_args(shape + ["--use-checkpoint-args"], stored_config=lambda d, step: stored)


def test_train_tokens_caps_train_iters_and_samples():
    # 32 tokens per sample x 1 sample per step: 100 tokens end the run after 4 steps, before --train-samples 10.
    assert parse_config(BASE + ["--train-tokens", "100"])[1].train_iters == 4
    argv = SHAPE + RUN
    assert parse_config(argv + ["--train-samples", "10", "--train-tokens", "100"])[1].train_iters == 4
    assert parse_config(argv + ["--train-samples", "3", "--train-tokens", "1000"])[1].train_iters == 3
    with pytest.raises(UserError, match="train_iters and training.train_samples are exclusive"):
        parse_config(BASE + ["--train-samples", "3"])
