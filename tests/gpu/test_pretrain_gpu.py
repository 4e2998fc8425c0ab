"""pretrain_gpt.py on GPUs under the deepspeed launcher: fp16 with dynamic loss scaling (CPU DeepSpeed
has no fp16), bf16 with FusedAdam, and the MFU column. Skipped without CUDA."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.tokenizer import build_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REPO = Path(__file__).resolve().parents[2]
SP_MODEL = str(REPO / "tests/data/sp_test_model.model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    docs = [json.loads(line)["text"] for line in open(REPO / "tests/data/wiki_summaries_500.jsonl")]
    prefix = str(tmp_path_factory.mktemp("corpus") / "text_document")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    for ids in tok.tokenize_batch(docs):
        b.add_document(np.array(ids + [tok.eod]))
    b.finalize()
    return prefix


def launch(corpus: str, save: Path, extra: list[str]) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpus = min(torch.cuda.device_count(), 2)
    # The launcher as a module: on the GPU machine deepspeed is a carried wheel (pip --target), whose
    # `deepspeed` script is not next to the interpreter.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), "--master_port", str(port),
           "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
           "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "8",
           "--global-batch-size", str(8 * gpus), "--train-iters", "40", "--lr", "3e-3", "--lr-warmup-iters", "4",
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL, "--data-path", corpus,
           "--split", "95,4,1", "--eval-interval", "20", "--eval-iters", "2", "--log-interval", "1",
           "--save", str(save), *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line) for line in open(save / "metrics.jsonl")]


def test_fp16_dynamic_loss_scale(corpus, tmp_path):
    recs = [r for r in launch(corpus, tmp_path / "fp16", ["--fp16", "--zero-stage", "1"]) if "loss" in r]
    finite = [r["loss"] for r in recs if r["loss"] is not None]
    assert sum(finite[-3:]) / 3 < finite[0] - 0.5
    assert all(r["loss_scale"] is not None and r["loss_scale"] >= 1 for r in recs)


def test_bf16_fused_adam_reports_mfu(corpus, tmp_path):
    recs = [r for r in launch(corpus, tmp_path / "bf16", ["--bf16", "--zero-stage", "2", "--peak-tflops", "100"])
            if "loss" in r]
    assert sum(r["loss"] for r in recs[-3:]) / 3 < recs[0]["loss"] - 0.5
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 and math.isfinite(r["tflops"]) for r in recs[1:])
