"""DataConfig through the shared flag/YAML parser, and tools/build_data_indices.py end to end."""
import os
import subprocess
import sys

import pytest

from data_testutils import EOD, make_random_dataset
from megaclm.config import parse_args
from megaclm.config.data import DataConfig, parse_blend, parse_mixing_schedule, parse_split
from megaclm.data.builder import build_train_valid_test, train_valid_test_num_samples
from megaclm.utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPT2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(ROOT, "tests/data/gpt2-vocab.json"),
        "--merge-file", os.path.join(ROOT, "tests/data/gpt2-merges.txt")]


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    return make_random_dataset(d, "a", 300, seed=1), make_random_dataset(d, "b", 300, seed=2)


def test_megatron_flags_fill_the_data_section(prefixes, tmp_path):
    a, b = prefixes
    cfg = parse_args(["--data-path", "0.3", a, "0.7", b, "--split", "98,2", "--seq-length", "64", "--eod-mask-loss",
                      "--reset-position-ids", "--reset-attention-mask", "--data-cache-path", str(tmp_path),
                      "--curriculum-seqlen-start", "16", "--curriculum-seqlen-steps", "100",
                      "--data-mixing-schedule", "0:1,0", "1e6:0.5,0.5", "--num-workers", "0"],
                     sections=("data",)).cfg.data
    assert cfg.data_path == ["0.3", a, "0.7", b] and cfg.split_fractions == (0.98, 0.02, 0.0)
    assert cfg.eod_mask_loss and cfg.reset_position_ids and cfg.reset_attention_mask and cfg.num_workers == 0
    assert cfg.mixing_phases == [(0, [1.0, 0.0]), (1000000, [0.5, 0.5])]
    assert (cfg.curriculum_seqlen_start, cfg.curriculum_seqlen_steps) == (16, 100)


def test_yaml_numbers_become_strings(prefixes, tmp_path):
    a, b = prefixes
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  data_path: [1, {a}, 3, {b}]\n  data_mixing_schedule: ['0:1,1']\n  seq_length: 32\n")
    cfg = parse_args(["--config", str(path)], sections=("data",)).cfg.data
    assert parse_blend(cfg.data_path, "x") == ([0.25, 0.75], [a, b])
    with pytest.raises(UserError, match="data.data_path has 3 entries"):
        parse_args(["--data-path", "0.3", a, "0.7"], sections=("data",))


def test_parsers_reject_bad_values():
    assert parse_split("2/1/1") == (0.5, 0.25, 0.25)
    for bad in ("1,2,3,4", "", "-1,2", "0,1"):
        with pytest.raises(UserError, match="data.split"):
            parse_split(bad)
    with pytest.raises(UserError, match=r"entry 1 should be a dataset prefix"):
        parse_blend(["0.5", "1.5"], "data.data_path")
    with pytest.raises(UserError, match=r"entry 2 should be a weight"):
        parse_blend(["0.5", "a", "b", "c"], "data.data_path")
    for bad, msg in ((["0:1", "0:1"], "must increase"), (["x:1"], "START_TOKENS"), (["0:1", "5:1,2"], "phase 0 has 1"),
                     (["0:0,0"], "all weights are zero"), (["0:-1,2"], "non-negative")):
        with pytest.raises(UserError, match=msg):
            parse_mixing_schedule(bad)
    for kwargs, msg in ((dict(seq_length=0), "seq_length"), (dict(num_workers=-1), "num_workers"),
                        (dict(curriculum_seqlen_start=4096, curriculum_seqlen_steps=1), "between 1 and"),
                        (dict(curriculum_seqlen_steps=10), "need data.curriculum_seqlen_start"),
                        (dict(valid_data_path=["x"]), "need data.train_data_path"),
                        (dict(data_path=["x"], data_path_file="f"), "exclusive")):
        with pytest.raises(UserError, match=msg):
            DataConfig(**kwargs)


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools/build_data_indices.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_build_data_indices_tool_prebuilds_what_training_loads(prefixes, tmp_path):
    a, b = prefixes
    cache = str(tmp_path / "cache")
    flags = ["--data-path", "0.5", a, "0.5", b, "--split", "90,8,2", "--seq-length", "32", "--train-iters", "50",
             "--global-batch-size", "8", "--eval-interval", "20", "--eval-iters", "2", "--seed", "77",
             "--data-cache-path", cache, *GPT2]
    result = _tool(*flags)
    assert result.returncode == 0, result.stderr
    assert "train: 400 samples requested" in result.stdout
    # The trainer's build with the same flags finds every cache (nothing is rebuilt).
    cfg = parse_args(flags, sections=("data", "tokenizer", "training")).cfg
    samples = train_valid_test_num_samples(50, 8, 20, 2)
    datasets = build_train_valid_test(cfg.data, seed=77, train_samples=samples[0], valid_samples=samples[1],
                                      test_samples=samples[2], eod_id=EOD)
    parts = [p for ds in datasets if ds is not None for p in ds.datasets]
    assert parts and not any(p.built for p in parts)


def test_build_data_indices_tool_bad_input_is_one_error_line(tmp_path):
    result = _tool("--data-path", str(tmp_path / "missing"), "--train-iters", "1", *GPT2)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
