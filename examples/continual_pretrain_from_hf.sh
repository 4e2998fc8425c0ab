#!/usr/bin/env bash
# Continual pretraining of a Hugging Face model with megaclm: pretrain_gpt.py --pretrained-checkpoint HF_MODEL
# -> export, with the perplexity before and after (tools/eval_perplexity.py, same rule for both).
# Step 3 is one command for the first launch and every restart: `--save RUN --load RUN --pretrained-checkpoint
# HF_MODEL` imports the HF weights at start-up while RUN holds no checkpoint, and resumes from RUN once it does
# (run the script again with RESUME=1 after a crash: step 3 then resumes $WORK/run instead of starting it over).
#
#   HF_MODEL=/models/Llama-3.2-1B DATA_JSONL=corpus.jsonl NUM_GPUS=8 TP=2 PP=1 TRAIN_ITERS=2000 \
#       bash examples/continual_pretrain_from_hf.sh [more pretrain_gpt.py flags]
#
# HF_MODEL is a local directory as save_pretrained writes it (config.json, *.safetensors, tokenizer.json):
# GPT-2, Llama (incl. Llama 3.x), Mistral or Qwen2. Without HF_MODEL the script runs offline on the CPU
# with a tiny random Llama and the shipped Wikipedia summaries (a smoke run of the whole workflow).
# LAUNCHER="python tools/check_layout.py --world-size 8" proves step 3's layout instead (README) and stops there.
# Results: $WORK/model_config.yaml (the model's shape and tokenizer), $WORK/run (training), $WORK/hf (the trained
# model for transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/continual_pretrain}
NUM_GPUS=${NUM_GPUS:-2}
TP=${TP:-2}
PP=${PP:-1}
SEQ=${SEQ:-64}
TRAIN_ITERS=${TRAIN_ITERS:-20}
LR=${LR:-3e-4}
MASTER_PORT=${MASTER_PORT:-29517}
DATA_JSONL=${DATA_JSONL:-tests/data/wiki_summaries_500.jsonl}
EVAL_JSONL=${EVAL_JSONL:-$DATA_JSONL}
# --log_level error: without the launcher's INFO lines and "Unable to find hostfile" (one node needs none)
LAUNCHER=${LAUNCHER:-$(dirname "$PY")/deepspeed --log_level error --num_gpus $NUM_GPUS --master_port $MASTER_PORT}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"

if [ -z "${HF_MODEL:-}" ]; then
    HF_MODEL=$WORK/tiny-llama-hf
    echo "== 0. no HF_MODEL given: writing a tiny random Llama to $HF_MODEL"
    [ -d "$HF_MODEL" ] || "$PY" tools/checkpoint/tiny_hf_model.py --family llama --out "$HF_MODEL"
    LR=3e-3  # a random tiny model learns visibly in a few steps only with a large rate
fi

echo "== 1. tokenize the corpus with the model's own tokenizer"
"$PY" tools/preprocess_data.py --input "$DATA_JSONL" --json-keys text \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_MODEL" \
    --append-eod --workers 2 --output-prefix "$WORK/data"

echo "== 2. the model's shape and tokenizer as a megaclm --config (config.json; no weights read)"
rm -f "$WORK/model_config.yaml"
"$PY" tools/checkpoint/convert_hf.py config --hf "$HF_MODEL" --out "$WORK/model_config.yaml"

echo "== 3. continue pretraining from the HF weights (imported for TP=$TP x PP=$PP at start-up; fresh optimizer and"
echo "      schedule), or resume $WORK/run where a previous launch saved"
[ -n "${RESUME:-}" ] || rm -rf "$WORK/run"
$LAUNCHER pretrain_gpt.py \
    --config "$WORK/model_config.yaml" --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --save "$WORK/run" --load "$WORK/run" --pretrained-checkpoint "$HF_MODEL" \
    --data-path "$WORK/data_text_document" --split 98,2,0 \
    --seq-length "$SEQ" --micro-batch-size 4 --global-batch-size 16 --train-iters "$TRAIN_ITERS" \
    --lr "$LR" --min-lr 0 --lr-decay-style cosine --lr-warmup-iters 2 \
    --weight-decay 0.1 --clip-grad 1.0 --zero-stage 1 \
    --save-interval "$TRAIN_ITERS" --eval-interval "$TRAIN_ITERS" --eval-iters 2 --log-interval 5 \
    "$@"

case "$LAUNCHER" in  # LAUNCHER="python tools/check_layout.py ...": step 3 checked the layout, nothing trained
    *check_layout*) echo "== layout checked; no run to export (steps 4-5 skipped)"; exit 0 ;;
esac

echo "== 4. export: megaclm checkpoint (any TP/PP) -> HF directory"
rm -rf "$WORK/hf"
"$PY" tools/checkpoint/convert_hf.py export --load "$WORK/run" --out "$WORK/hf"

echo "== 5. perplexity before and after, by the same rule (transformers runs both models)"
for model in "$HF_MODEL" "$WORK/hf"; do
    echo "$model: $("$PY" tools/eval_perplexity.py --hf "$model" --input "$EVAL_JSONL" --seq-length "$SEQ" \
        --max-windows 64 | tail -n 1)"
done
