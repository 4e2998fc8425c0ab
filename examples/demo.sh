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
    --append-eod --workers 2 \
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

# ==== 3. training: appended by the trainer issue (pretrain on $OUT/data/demo_text_document) ====
