#!/usr/bin/env bash
# megaclm demo: `make demo` (or `bash examples/demo.sh .venv/bin`). Linear on purpose: read it top to bottom.
set -euo pipefail
BIN=${1:-.venv/bin}
cd "$(dirname "$0")/.."
DATA=tests/data
OUT=runs/demo
mkdir -p "$OUT/data"

echo "== 1. preprocess the shipped corpus (500 Wikipedia summaries + Hamlet) with GPT-2 BPE"
"$BIN/python" tools/preprocess_data.py \
    --input "$DATA/wiki_summaries_500.jsonl" "$DATA/hamlet.txt" \
    --json-keys text \
    --tokenizer-type GPT2BPETokenizer \
    --vocab-file "$DATA/gpt2-vocab.json" --merge-file "$DATA/gpt2-merges.txt" \
    --append-eod --workers 2 --overwrite \
    --output-prefix "$OUT/data/demo"

echo "== 2. dataset stats"
"$BIN/python" - "$OUT/data/demo_text_document" <<'PY'
import sys
import numpy as np
from megaclm.data.indexed_dataset import IndexedDataset
from megaclm.tokenizer import build_tokenizer

prefix = sys.argv[1]
ds = IndexedDataset(prefix)
sizes = ds.sizes
tok = build_tokenizer("GPT2BPETokenizer", vocab_file="tests/data/gpt2-vocab.json", merge_file="tests/data/gpt2-merges.txt")
print(f"{prefix}: {len(ds.document_indices) - 1} documents, {ds.num_tokens()} tokens, dtype {np.dtype(ds.dtype).name}")
print(f"document length: min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()} tokens")
print(f"first document starts: {tok.detokenize(ds.get(0, 0, 24).tolist())!r}")
PY


echo "== 3. train a tiny GPT (4 layers, hidden 128, GPT-2 vocabulary) with DeepSpeed on 2 CPU processes (DP=2, ZeRO-1)"
# One thread per rank (the launcher sets none: 2 ranks x all cores would oversubscribe); DeepSpeed
# JIT-builds its CPU communication op once (~50 s) into TORCH_EXTENSIONS_DIR.
export OMP_NUM_THREADS=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
# Quiet by default (VERBOSE=1 shows every line): no GPU -> DS_ACCELERATOR=cpu, so no DeepSpeed process warns
# that it had to guess; the launcher at --log_level error (its INFO lines, and "Unable to find hostfile",
# which one node does not need; a rank that fails is still reported).
if "$BIN/python" -c 'import sys, torch; sys.exit(int(torch.cuda.is_available()))'; then  # exit 0: no GPU
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
LAUNCHER_LOG=error VERBOSE_FLAG=
if [ "${VERBOSE:-0}" = 1 ]; then LAUNCHER_LOG=info VERBOSE_FLAG=--verbose; fi
rm -rf "$OUT/ckpt"
START=$(date +%s)
PORT=${MASTER_PORT:-29517}
# Each rank removes its 66 MiB /dev/shm buffer when it exits; this catches ranks killed outright (SIGKILL).
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$PORT"_*' EXIT
"$BIN/deepspeed" --log_level "$LAUNCHER_LOG" --num_gpus 2 --master_port "$PORT" pretrain_gpt.py $VERBOSE_FLAG \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
    --seq-length 128 --max-position-embeddings 128 \
    --hidden-dropout 0.0 --attention-dropout 0.0 \
    --micro-batch-size 4 --global-batch-size 8 --train-iters 100 \
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 --weight-decay 0.1 --clip-grad 1.0 \
    --zero-stage 1 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/gpt2-vocab.json" --merge-file "$DATA/gpt2-merges.txt" \
    --data-path "$OUT/data/demo_text_document" --split 95,4,1 --num-workers 0 \
    --eval-interval 50 --eval-iters 4 --log-interval 10 \
    --save "$OUT/ckpt" --save-interval 100

echo "== 4. summary ($OUT/ckpt/metrics.jsonl)"
"$BIN/python" - "$OUT/ckpt/metrics.jsonl" "$(( $(date +%s) - START ))" <<'PY'
import json, math, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in recs if "loss" in r]
val = [r for r in recs if "val_loss" in r]
print(f"loss {train[0]['loss']:.2f} at iteration {train[0]['iteration']} (ln(vocab) = {math.log(50257):.2f}) "
      f"-> {train[-1]['loss']:.2f} at iteration {train[-1]['iteration']}")
print(f"validation perplexity {val[-1]['val_ppl']:.1f} (loss {val[-1]['val_loss']:.2f}) after {val[-1]['iteration']} iterations")
print(f"training wall time {sys.argv[2]} s (launch included)")
PY
