"""Megatron users' launch scripts, as they are: the argument lists of Megatron-LM's and Megatron-DeepSpeed's
own examples (tests/data/megatron_scripts/*.args, each naming its source) go through
`pretrain_gpt.py --validate-only` as a subprocess, and every flag gets the fate megaclm's table gives it:
refused flags end the run with one `error:` line naming all of them (exit 2); without them the script
resolves, each ignored flag is logged once with its reason, and the aliases land in the resolved config.
Then the Llama-2 examples of both projects train under `deepspeed --num_gpus 2` with only paths and
sizes changed."""
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megaclm.config import build_parser
from megaclm.config.megatron_compat import IGNORED, REFUSED, TABLE

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from data_testutils import write_llama3_model  # noqa: E402

SCRIPTS = ROOT / "tests" / "data" / "megatron_scripts"
DATA = ROOT / "tests" / "data"
BY_FLAG = {c.flag: c for c in TABLE}
NATIVE = {s for a in build_parser()._actions for s in a.option_strings}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))


def _tool(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_script(name: str) -> tuple[dict, list[str]]:
    """(header fields, argv tokens) of one vendored argument list."""
    header, tokens = {}, []
    for line in (SCRIPTS / f"{name}.args").read_text().splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            header[key] = value
        else:
            tokens.append(line)
    return header, tokens


def flags_of(tokens: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for tok in tokens:
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            out.append((name, [value] if eq else []))
        else:
            out[-1][1].append(tok)
    return out


def expected_fates(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(refused, ignored) flags of an argument list by the table (a conditional fate by its value)."""
    refused, ignored = [], []
    for flag, values in flags_of(tokens):
        c = BY_FLAG.get(flag)
        if c is None:
            continue
        if c.fate == REFUSED or (c.only and values[0] not in c.only):
            refused.append(flag)
        elif c.fate == IGNORED:
            ignored.append(flag)
    return refused, ignored


def without(tokens: list[str], drop: list[str]) -> list[str]:
    return [t for flag, values in flags_of(tokens) if flag not in drop for t in (flag, *values)]


def substitute(tokens: list[str], paths: dict[str, str]) -> list[str]:
    return [re.sub(r"\{([A-Z0-9_]+)\}", lambda m: paths[m.group(1)], t) for t in tokens]


def cli(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pretrain_gpt.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def launch(args: list[str]) -> subprocess.CompletedProcess:
    from test_hf_conversion import launch as ds_launch  # deepspeed --num_gpus N on a free port, shm cleaned

    return ds_launch(2, ["pretrain_gpt.py", *args])


def resolved(stdout: str) -> dict:
    return yaml.safe_load(stdout.split("# resolved config")[1].split("# derived")[0])


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Real files for every placeholder: tokenizers, a dataset per tokenizer, DeepSpeed configs, and tiny
    HF Llama imports for the --use-checkpoint-args scripts."""
    root = tmp_path_factory.mktemp("megatron")
    tiny, convert = _tool("tools/checkpoint/tiny_hf_model.py"), _tool("tools/checkpoint/convert_hf.py")
    p = {"VOCAB_FILE": str(DATA / "gpt2-vocab.json"), "MERGE_FILE": str(DATA / "gpt2-merges.txt"),
         "TOKENIZER_MODEL": str(DATA / "sp_test_model.model"), "TENSORBOARD": str(root / "tb"),
         "DATA_CACHE": str(root / "cache"), "TP": "1", "ROOT": str(root)}
    p["HF_TOKENIZER"] = str(root / "hf-tokenizer")
    os.makedirs(p["HF_TOKENIZER"])
    tiny.write_gpt2_tokenizer(p["HF_TOKENIZER"], p["VOCAB_FILE"], p["MERGE_FILE"])
    p["LLAMA3_MODEL"] = write_llama3_model(str(root / "llama3.model"), p["VOCAB_FILE"])
    # One small corpus, tokenized the way each family's script expects (the MDS Llama-2 script reads a
    # sentence-level dataset, `..._text_sentence`).
    docs = root / "docs.jsonl"
    docs.write_text("".join(line for line in open(DATA / "wiki_summaries_500.jsonl")))
    for name, tok, extra in (("gpt2", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", p["VOCAB_FILE"],
                                       "--merge-file", p["MERGE_FILE"]], []),
                             ("sp", ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
                                     p["TOKENIZER_MODEL"]], ["--split-sentences"]),
                             ("llama2", ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                                         p["TOKENIZER_MODEL"]], [])):
        r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(docs), *tok, "--append-eod",
                            "--workers", "1", "--output-prefix", str(root / name), *extra],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    p["DATA_PATH"] = str(root / "gpt2_text_document")
    p["SP_DATA"], p["LLAMA2_DATA"] = str(root / "sp_text_sentence"), str(root / "llama2_text_document")
    # HF Llamas with the vocabularies of the docs' tokenizers, imported as megaclm checkpoints.
    for name, vocab in (("llama2", 1000), ("llama3", 50256 + 256)):
        hf = str(root / f"{name}-hf")
        _write_tiny_llama(tiny, hf, vocab)
        p[f"{name.upper()}_CKPT"] = str(root / f"{name}-import")
        convert.import_hf(hf, p[f"{name.upper()}_CKPT"])
    return p


def _write_tiny_llama(tiny, out: str, vocab: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny.tiny_config("llama", vocab)),
                                             dtype=torch.float32)
    model.save_pretrained(out)


# The docs' blocks list what to add for loading a converted checkpoint; a run needs data and a length too.
DOCS_RUN = ["--data-path", "{LLAMA2_DATA}", "--micro-batch-size", "1", "--train-iters", "10"]

# name -> (placeholder overrides, expected values in the resolved config after the refused flags are dropped)
SCRIPT_EXPECTATIONS = {
    "mlm_gpt3_175b": ({}, {("parallel", "tensor_model_parallel_size"): 8,
                           ("parallel", "pipeline_model_parallel_size"): 16, ("precision", "fp16"): True}),
    "mlm_llama3_8b": ({}, {("model", "num_query_groups"): 8, ("model", "apply_layernorm_1p"): True,
                           ("kernels", "attention_backend"): "sdpa", ("zero", "zero_stage"): 1,
                           ("zero", "overlap_grad_reduce"): True,
                           ("optimizer", "decoupled_lr"): 5e-4, ("scheduler", "lr_warmup_samples"): 3906252,
                           ("tokenizer", "tokenizer_type"): "HuggingFaceTokenizer", ("logging", "profile"): True,
                           ("logging", "profile_step_start"): 4, ("logging", "profile_step_end"): 6}),
    "mlm_llama2_docs": ({"CHECKPOINT": "LLAMA2_CKPT"},
                        {("model", "position_embedding_type"): "rope", ("model", "num_layers"): 2,
                         ("tokenizer", "tokenizer_type"): "Llama2Tokenizer",
                         ("checkpoint", "use_checkpoint_args"): True}),
    "mlm_llama3_docs": ({"CHECKPOINT": "LLAMA3_CKPT", "TOKENIZER_MODEL": "LLAMA3_MODEL"},
                        {("model", "position_embedding_type"): "rope", ("model", "hidden_size"): 64,
                         ("tokenizer", "tokenizer_type"): "Llama3Tokenizer"}),
    "mds_llama2": ({}, {("model", "position_embedding_type"): "rope", ("model", "num_query_groups"): 4,
                        ("model", "normalization"): "RMSNorm", ("zero", "zero_stage"): 0,
                        ("tokenizer", "tokenizer_type"): "SentencePieceTokenizer"}),
    "mds_gpt_125m": ({}, {("model", "recompute_granularity"): "full", ("zero", "zero_stage"): 1,
                          ("tokenizer", "tokenizer_type"): "GPT2BPETokenizer", ("training", "train_tokens"): 300e9}),
    "mds_ulysses_1.3b_32k": ({}, {("kernels", "attention_backend"): "flash", ("parallel", "ds_sequence_parallel_size"): 4,
                                  ("parallel", "pipeline_model_parallel_size"): 1}),
}


def test_every_vendored_script_is_covered_and_names_its_source():
    names = sorted(Path(f).stem for f in glob.glob(str(SCRIPTS / "*.args")))
    assert names == sorted(SCRIPT_EXPECTATIONS)
    for name in names:
        header, tokens = read_script(name)
        assert re.match(r"(NVIDIA/Megatron-LM|microsoft/Megatron-DeepSpeed) @ \S+", header["source"]), name
        unknown = [f for f, _ in flags_of(tokens) if f not in NATIVE and f not in BY_FLAG]
        assert unknown == [], f"{name}: flags with no fate: {unknown}"


@pytest.mark.parametrize("name", sorted(SCRIPT_EXPECTATIONS))
def test_script_flags_get_their_fate_under_validate_only(name, paths):
    header, tokens = read_script(name)
    overrides, expected = SCRIPT_EXPECTATIONS[name]
    mine = {**paths, "CHECKPOINT": str(Path(paths["ROOT"]) / f"ckpt-{name}"),
            "DS_CONFIG": str(SCRIPTS / f"{name}.deepspeed.json"),
            **{k: paths[v] for k, v in overrides.items()}}
    if name == "mds_llama2":
        mine["DATA_PATH"] = paths["SP_DATA"]
    if name.endswith("_docs"):
        tokens = tokens + DOCS_RUN
    argv = substitute(tokens, mine) + ["--validate-only", "--world-size", header["world-size"].split()[0]]
    refused, ignored = expected_fates(tokens)
    if refused:
        r = cli(argv)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
        assert all(f"{flag} " in errors[0] for flag in refused), errors[0]
        assert "unrecognized arguments" not in r.stderr and "Traceback" not in r.stderr
        argv = without(argv, refused)
    r = cli(argv)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = re.findall(r"ignoring (--[\w-]+)", r.stderr)
    assert sorted(logged) == sorted(ignored), r.stderr[-3000:]
    tree = resolved(r.stdout)
    for (section, key), value in expected.items():
        assert tree[section][key] == value, (section, key, tree[section][key])


def _losses(save: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(save, "metrics.jsonl")) if '"loss"' in line]


def test_megatron_deepspeed_llama2_example_trains(paths, tmp_path):
    """examples_deepspeed/pretrain_llama2_distributed.sh with sizes for 2 CPU ranks (TP=2, PP=1, a tiny
    model, 8 steps) and paths to a sentence-level GPTSentencePieceTokenizer dataset; its own DeepSpeed JSON."""
    _, tokens = read_script("mds_llama2")
    ds = json.loads((SCRIPTS / "mds_llama2.deepspeed.json").read_text())
    ds.update(train_batch_size=4, train_micro_batch_size_per_gpu=2)
    (tmp_path / "deepspeed.json").write_text(json.dumps(ds))
    sizes = {"--pipeline-model-parallel-size": ["1"], "--num-layers": ["2"], "--hidden-size": ["64"],
             "--ffn-hidden-size": ["128"], "--num-attention-heads": ["4"], "--num-key-value-heads": ["2"],
             "--micro-batch-size": ["2"], "--global-batch-size": ["4"], "--seq-length": ["64"],
             "--max-position-embeddings": ["64"], "--train-iters": ["8"], "--lr-warmup-iters": ["1"],
             "--lr": ["3e-3"], "--eval-interval": ["4"], "--eval-iters": ["1"], "--save-interval": ["8"]}
    save = str(tmp_path / "run")
    argv = [t for flag, values in flags_of(substitute(tokens, {**paths, "CHECKPOINT": save,
                                                               "DATA_PATH": paths["SP_DATA"],
                                                               "DS_CONFIG": str(tmp_path / "deepspeed.json")}))
            for t in (flag, *sizes.get(flag, values))]
    proc = launch(argv)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    losses = _losses(save)
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000008"


def test_megatron_lm_llama2_docs_arguments_continue_an_imported_model(paths, tmp_path):
    """Megatron-LM's documented Llama-2 arguments (--use-checkpoint-args, --no-load-optim, ...) on an imported
    HF Llama: the model shape comes from the checkpoint, its weights are loaded, and training continues."""
    _, tokens = read_script("mlm_llama2_docs")
    save = str(tmp_path / "run")
    argv = substitute(tokens, {**paths, "CHECKPOINT": paths["LLAMA2_CKPT"]})
    argv = [t for flag, values in flags_of(argv)
            for t in (flag, *{"--seq-length": ["64"], "--max-position-embeddings": ["256"]}.get(flag, values))]
    run = ["--data-path", paths["LLAMA2_DATA"], "--split", "100,0,0", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "6", "--lr", "3e-3", "--lr-decay-style", "constant",
           "--eval-iters", "0", "--log-interval", "1", "--save", save]
    proc = launch(argv + run)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert re.search(rf"loaded checkpoint {re.escape(paths['LLAMA2_CKPT'])}/iter_\d+", out), out[-3000:]
    stored = json.loads(open(os.path.join(save, "iter_0000006", "megaclm", "config.json")).read())
    assert (stored["model"]["num_layers"], stored["model"]["hidden_size"]) == (2, 64)  # from the checkpoint
    losses = _losses(save)
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    missing = cli(argv[:argv.index("--load") + 1] + [str(tmp_path / "empty")] + argv[argv.index("--load") + 2:]
                  + run[:-2])
    assert missing.returncode == 2 and "no checkpoint in --load" in missing.stderr, missing.stderr[-2000:]
