"""pretrain_gpt.py as a user runs it, without a launcher: config errors end with one `error:` line
and exit status 2 before any process group or model exists; --validate-only prints the resolved
config and derived values; the example launch scripts resolve, and the Llama shell script and its
YAML twin resolve to the same config."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from megaclm.data.indexed_dataset import IndexedDatasetBuilder

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
VOCAB, MERGES = str(REPO / "tests/data/gpt2-vocab.json"), str(REPO / "tests/data/gpt2-merges.txt")
SP_MODEL = str(REPO / "tests/data/sp_test_model.model")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> str:
    p = str(tmp_path_factory.mktemp("data") / "text_document")
    b = IndexedDatasetBuilder(p, np.uint16)
    for n in (300, 500, 700):
        b.add_document(np.arange(n) % 900)
    b.finalize()
    return p


def cli(args: list[str], env: dict | None = None, script: str = "pretrain_gpt.py") -> subprocess.CompletedProcess:
    return subprocess.run([PY, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def good(prefix: str) -> list[str]:
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", "10", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB,
            "--merge-file", MERGES, "--data-path", prefix]


@pytest.mark.parametrize("extra, env, message", [
    (["--tensor-model-parallel-size", "3"], {"WORLD_SIZE": "3"},
     "model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], {"WORLD_SIZE": "2"},
     "needs zero.zero_stage 0 or 1, got 3"),
    (["--seq-length", "128"], {}, "data.seq_length=128 is larger than model.max_position_embeddings=64"),
    (["--global-batch-size", "7"], {"WORLD_SIZE": "2"}, "global_batch_size=7 is not divisible"),
    (["--data-path", "/nowhere/x"], {}, "/nowhere/x.bin and /nowhere/x.idx not found"),
    (["--hidden-size", "sixty"], {}, "model.hidden_size expects an integer, got 'sixty'"),
    (["--ds-sequence-parallel-size", "2"], {"WORLD_SIZE": "3"}, "world size 3 is not divisible"),
    (["--ds-sequence-parallel-size", "8"], {"WORLD_SIZE": "8"}, "4 heads per tensor-parallel rank are not divisible"),
    (["--context-parallel-size", "2", "--position-embedding-type", "alibi"], {"WORLD_SIZE": "2"}, "not ALiBi"),
    (["--context-parallel-size", "2", "--ds-sequence-parallel-size", "2"], {"WORLD_SIZE": "4"}, "not both"),
    (["--context-parallel-size", "2", "--seq-length", "62"], {"WORLD_SIZE": "2"},
     "data.seq_length=62 is not divisible by 4"),
    (["--ds-sequence-parallel-size", "2", "--curriculum-seqlen-start", "8", "--curriculum-seqlen-steps", "4",
      "--curriculum-seqlen-multiple", "9"], {"WORLD_SIZE": "2"}, "must be multiples of 2"),
    (["--zero-stage", "0", "--overlap-grad-reduce"], {}, "zero.overlap_grad_reduce needs ZeRO stage 1 or 2"),
    (["--lr", "inf"], {}, "argument --lr: optimizer.lr=inf is not a finite number"),
    (["--adam-eps", "nan"], {}, "argument --adam-eps: optimizer.adam_eps=nan is not a finite number"),
])
def test_config_errors_exit_with_one_line(prefix, extra, env, message):
    r = cli(good(prefix) + extra, env)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("[")]  # DeepSpeed's import banner
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "init_distributed" not in r.stderr + r.stdout


def test_tokenizer_vocab_larger_than_checkpoint_model(prefix, tmp_path):
    """A checkpoint made for a 1,024-entry vocabulary cannot take GPT-2's 50,257 tokens."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000010/megaclm").mkdir(parents=True)
    (ckpt / "latest").write_text("iter_0000010")
    (ckpt / "iter_0000010/megaclm/meta.json").write_text(json.dumps({"padded_vocab_size": 1024, "iteration": 10}))
    r = cli(good(prefix) + ["--load", str(ckpt)])
    assert r.returncode == 2
    assert "tokenizer's vocabulary (50257 tokens) is larger than the model's (1024" in r.stderr


def _resolved(stdout: str) -> dict:
    """The YAML block of --validate-only (DeepSpeed may print its own log lines before it)."""
    return yaml.safe_load(stdout.split("# resolved config")[1].split("# derived")[0])


def test_validate_only_shows_the_sequence_split(prefix):
    r = cli(good(prefix) + ["--validate-only", "--world-size", "8", "--tensor-model-parallel-size", "2",
                            "--context-parallel-size", "2", "--attention-dropout", "0"])
    assert r.returncode == 0, r.stderr
    assert ("world 8 = tp 2 x cp 2 x dp 2 x pp 1 (rank order: tp fastest, then cp, dp, pp); each rank holds 32 of 64 "
            "tokens per sample") in r.stdout, r.stdout
    assert "seq_split_size: 2" in r.stdout and "grad_accum_steps: 2" in r.stdout
    assert re.search(r"activations per layer \(attention included\) [\d.]+ GiB, unsplit [\d.]+ GiB \(0\.\d+x\)", r.stdout)
    assert _resolved(r.stdout)["parallel"]["context_parallel_size"] == 2


def test_validate_only_prints_config_and_derived(prefix):
    r = cli(good(prefix) + ["--validate-only", "--world-size", "4", "--tensor-model-parallel-size", "2", "--bf16"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("data_parallel_size: 2", "grad_accum_steps: 2", "tokens_per_step: 512", "padded_vocab_size: 50432",
                 "parameters: ", "# memory per GPU", "total"):
        assert line in out, out
    tree = _resolved(out)
    assert tree["model"]["hidden_size"] == 64 and tree["precision"]["bf16"] is True
    ds = json.loads(out.split("# deepspeed config")[1])
    assert ds["train_batch_size"] == 8 and ds["bf16"]["enabled"] and ds["optimizer"]["params"]["torch_adam"]


def test_yaml_numbers_with_an_exponent_are_floats_and_former_training_keys_load(prefix, tmp_path):
    """YAML 1.2 floats (PyYAML's YAML 1.1 reads `1e-3` as a string); a quoted value stays a string. A file of
    before the precision/zero sections (bf16, zero_stage under training:) loads, with one deprecation line."""
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  min_lr: 3e-4\n  clip_grad: 6e+2\n"
                    "model:\n  init_method_std: .5\nlogging:\n  wandb_project: \"1e-3\"\n"
                    "training:\n  bf16: true\n  zero_stage: 2\n")
    r = cli(good(prefix) + ["--validate-only", "--config", str(path)])
    assert r.returncode == 0, r.stderr
    tree = _resolved(r.stdout)
    assert tree["precision"]["bf16"] is True and tree["zero"]["zero_stage"] == 2 and "bf16" not in tree["training"]
    moved = [line for line in r.stderr.splitlines() if "deprecated keys" in line]
    assert len(moved) == 1 and "training.bf16 -> precision.bf16, training.zero_stage -> zero.zero_stage" in moved[0]
    assert (tree["optimizer"]["lr"], tree["optimizer"]["min_lr"], tree["optimizer"]["clip_grad"]) == (1e-3, 3e-4, 600.0)
    assert tree["model"]["init_method_std"] == 0.5 and tree["logging"]["wandb_project"] == "1e-3"
    path.write_text("optimizer:\n  lr: .inf\n")
    r = cli(good(prefix) + ["--validate-only", "--config", str(path)])
    assert r.returncode == 2 and "error: optimizer.lr=inf is not a finite number" in r.stderr, r.stderr


@pytest.mark.parametrize("script", ["pretrain_gpt2_125m.sh", "pretrain_gpt_1.3b.sh"])
def test_example_scripts_resolve(prefix, script):
    env = dict(os.environ, LAUNCHER=PY, DATA=prefix)
    r = subprocess.run(["bash", f"examples/{script}", "--validate-only", "--world-size", "8"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "data_parallel_size: 8" in r.stdout


def test_llama_script_and_yaml_twin_agree(prefix, tmp_path):
    paths = ["--tokenizer-model", SP_MODEL, "--data-path", prefix, "--save", str(tmp_path), "--load", str(tmp_path),
             "--tensorboard-dir", f"{tmp_path}/tensorboard", "--validate-only", "--world-size", "16"]
    env = dict(os.environ, LAUNCHER=PY, DATA=prefix, TOKENIZER_MODEL=SP_MODEL, SAVE=str(tmp_path))
    sh = subprocess.run(["bash", "examples/pretrain_llama_7b.sh", "--validate-only", "--world-size", "16"], cwd=REPO,
                        capture_output=True, text=True, timeout=120, env=env)
    assert sh.returncode == 0, sh.stderr
    yml = cli(["--config", "examples/llama_7b.yaml", *paths])
    assert yml.returncode == 0, yml.stderr
    assert _resolved(sh.stdout) == _resolved(yml.stdout)
    assert "data_parallel_size: 8" in sh.stdout and "grad_accum_steps: 128" in sh.stdout


def test_validate_only_says_what_moe_does(prefix):
    """MoE flags (with Megatron-DeepSpeed aliases) resolve; the summary counts experts and active parameters."""
    r = cli(good(prefix) + ["--validate-only", "--world-size", "2", "--num-experts", "4", "--topk", "2",
                            "--moe-expert-parallel-size", "2", "--moe-loss-coeff", "0.01", "--mlp-type", "standard"])
    assert r.returncode == 0, r.stderr
    tree = _resolved(r.stdout)
    assert tree["model"]["num_experts"] == 4 and tree["model"]["moe_router_topk"] == 2
    assert tree["parallel"]["expert_model_parallel_size"] == 2 and tree["model"]["moe_aux_loss_coeff"] == 0.01
    assert "top-2 (top-k then softmax), capacity dropless" in r.stdout and "expert parallel 2" in r.stdout
    total = int(r.stdout.split("\nparameters: ")[1].split("\n")[0].replace(",", ""))
    active = int(r.stdout.split("active_parameters_per_token: ")[1].split("\n")[0].replace(",", ""))
    experts = int(r.stdout.split("expert_parameters: ")[1].split("\n")[0].replace(",", ""))
    assert total - active == experts // 2  # top-2 of 4 experts
    # The memory table's weights row (4 bytes per fp32 parameter a GPU holds) drops by half the experts at EP=2;
    # experts of 262144 make that half 0.5 GiB, well above the table's 0.01 GiB resolution.
    big = []
    for ep in ("1", "2"):
        r = cli(good(prefix) + ["--validate-only", "--world-size", "2", "--num-experts", "4", "--moe-ffn-hidden-size",
                                "262144", "--expert-model-parallel-size", ep])
        assert r.returncode == 0, r.stderr
        big.append((float(r.stdout.split("\nweights")[1].split()[0]),
                    int(r.stdout.split("expert_parameters: ")[1].split("\n")[0].replace(",", ""))))
    (w1, experts1), (w2, _) = big
    assert w1 - w2 == pytest.approx(4 * experts1 / 2 / 2**30, abs=0.01) and w1 - w2 > 0.4
    for bad, message in ((["--expert-model-parallel-size", "4"], "does not divide the data-parallel size 2"),
                         (["--mlp-type", "residual"], "--mlp-type residual is not supported"),
                         (["--zero-stage", "3"], "does not partition MoE layers' parameters under ZeRO-3")):
        r = cli(good(prefix) + ["--validate-only", "--world-size", "2", "--num-experts", "4", *bad])
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
def test_validate_only_says_which_features_are_on(prefix):
    r = cli(good(prefix) + ["--validate-only", "--bf16", "--torch-compile", "--fp8-format", "hybrid",
                            "--fp8-recipe", "rowwise"])
    assert r.returncode == 0, r.stderr
    features = r.stdout.split("# features")[1].split("# memory")[0]
    assert "lora: off" in features and "torch_compile: on (each transformer block); kernels: torch" in features
    assert "fp8: hybrid format, rowwise scaling (torchao.float8)" in features
    off = cli(good(prefix) + ["--validate-only"])
    assert "torch_compile: off" in off.stdout and "fp8: off" in off.stdout


@pytest.mark.parametrize("extra, overlap_comm, says", [
    (["--overlap-grad-reduce"], True,
     "bucket by bucket during the last micro-batch's backward, overlapped (--overlap-grad-reduce: DeepSpeed "
     "overlap_comm)"),
    (["--overlap-grad-reduce", "--zero-stage", "2"], True, "during each micro-batch's backward, overlapped"),
    ([], None, "after the last micro-batch's backward, waited for (--overlap-grad-reduce overlaps it)"),
    (["--overlap-grad-reduce", "--pipeline-model-parallel-size", "2"], None,
     "--overlap-grad-reduce has no effect with pipeline parallelism"),
])
def test_validate_only_says_when_gradients_are_reduced(prefix, extra, overlap_comm, says):
    """--overlap-grad-reduce (Megatron's flag) turns DeepSpeed's overlap_comm on at ZeRO-1/2, where it can run;
    its second reduce bucket shows in the memory table."""
    r = cli(good(prefix) + ["--validate-only", "--world-size", "2", "--bf16", *extra])
    assert r.returncode == 0, r.stderr
    assert "gradient reduction: " in r.stdout and says in r.stdout.split("gradient reduction: ")[1].split("\n")[0]
    ds = json.loads(r.stdout.split("# deepspeed config")[1])
    assert ds["zero_optimization"].get("overlap_comm") is overlap_comm
    bucket = re.search(r"^reduce bucket\s+([\d.]+)\s", r.stdout, re.M)  # GPU GiB: 5e8 bf16 elements each
    assert bucket and float(bucket.group(1)) == pytest.approx(0.93 * (2 if overlap_comm else 1), abs=0.01), r.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without FP8")
def test_fp8_is_refused_without_an_fp8_gpu(prefix):
    r = cli(good(prefix) + ["--bf16", "--fp8-format", "e4m3"])
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --fp8-format e4m3: there is no CUDA GPU; drop the --fp8-* flags and train in --bf16"]
    r = cli(good(prefix) + ["--fp8-format", "hybrid"])
    assert r.returncode == 2 and "precision.fp8_format='hybrid' needs --bf16" in r.stderr


def _write_dataset(prefix: str, lengths: tuple[int, ...], offset: int = 0) -> None:
    b = IndexedDatasetBuilder(prefix, np.uint16)
    for n in lengths:
        b.add_document((np.arange(n) + offset) % 900)
    b.finalize()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run, shared: 2 iterations into --save, both profiled (Megatron-LM's --profile
    --use-pytorch-profiler --profile-step-start 0 --profile-step-end 2): (data prefix, save dir, its flags, result)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    prefix, save = str(tmp_path / "data/text_document"), str(tmp_path / "ckpt")
    os.makedirs(os.path.dirname(prefix))
    _write_dataset(prefix, (3000, 5000, 7000))
    args = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL, "--data-path", prefix,
            "--split", "98,2,0", "--eval-iters", "1", "--num-workers", "0", "--save", save, "--load", save]
    first = cli(args + ["--train-iters", "2", "--profile", "--use-pytorch-profiler", "--profile-step-start", "0",
                        "--profile-step-end", "2"])
    assert first.returncode == 0, first.stderr
    return prefix, save, args, first


def test_profile_writes_a_trace_of_the_steps_asked(trained):
    """The trace of iterations 1 and 2 in <save>/profile, whole JSON, the model's matmuls inside the profiled steps,
    and the costliest ops in the log."""
    _, save, _, first = trained
    assert [p.name for p in Path(save, "profile").iterdir()] == ["rank0.iter1-2.pt.trace.json"]
    events = json.loads(Path(save, "profile/rank0.iter1-2.pt.trace.json").read_text())["traceEvents"]
    steps = [e for e in events if e.get("name", "").startswith("iteration ") and e.get("ph") == "X"]
    assert [e["name"] for e in steps] == ["iteration 1", "iteration 2"]
    inside = [e for e in events if e.get("ph") == "X" and e.get("name") in ("aten::mm", "aten::addmm", "aten::bmm")
              and steps[0]["ts"] <= e["ts"] <= steps[1]["ts"] + steps[1]["dur"]]
    assert inside, sorted({e.get("name") for e in events})
    log = first.stdout + first.stderr
    assert "--profile: iterations 1-2 traced to" in log and "Self CPU time total" in log


def test_resume_on_changed_data_is_refused(trained):
    """A checkpoint's data fingerprint: changed .bin/.idx files or --split are refused with the file or flag
    named (exit 2, before any process group: --validate-only runs the same check); --override-data-fingerprint
    accepts them. (Changes the shared run's data: the last user of `trained`.)"""
    prefix, save, args, _ = trained
    meta = json.loads(Path(save, "iter_0000002/megaclm/meta.json").read_text())
    assert meta["data_fingerprint"]["splits"]["train"]["files"][0]["path"] == prefix
    assert cli(args + ["--train-iters", "4", "--validate-only"]).returncode == 0  # unchanged data: accepted

    moved = cli(args + ["--train-iters", "4", "--split", "90,10,0", "--validate-only"])
    assert moved.returncode == 2 and "was trained with --split 98,2,0 but this run has 90,10,0" in moved.stderr

    _write_dataset(prefix, (3000, 5000, 7000), offset=1)  # same document sizes (same .idx), other tokens
    changed = cli(args + ["--train-iters", "4", "--validate-only"])
    assert changed.returncode == 2, changed.stderr
    assert f"error: data file {prefix}.bin changed since --load {save}/iter_0000002 was saved" in changed.stderr
    assert "--override-data-fingerprint" in changed.stderr and "Traceback" not in changed.stderr

    _write_dataset(prefix, (3000, 5000, 7001))
    resized = cli(args + ["--train-iters", "4", "--validate-only"])
    assert resized.returncode == 2 and f"data file {prefix}.idx changed" in resized.stderr

    forced = cli(args + ["--train-iters", "4", "--override-data-fingerprint", "--validate-only"])
    assert forced.returncode == 0 and "--override-data-fingerprint: not comparing the data" in forced.stderr
