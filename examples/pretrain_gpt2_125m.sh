#!/usr/bin/env bash
# GPT-2 small (125M: 12 layers, hidden 768, 12 heads, learned positions, LayerNorm, GeLU, tied head)
# on one node: ZeRO-1 data parallel, bf16, 0.5M-token batches (512 x 1024), cosine decay to 10%.
# GPT-3 paper hyper-parameters for this size (lr 6e-4, warmup 375M tokens, 300B tokens).
#
#   DATA=data/my_text_document NUM_GPUS=8 bash examples/pretrain_gpt2_125m.sh [more flags override these]
#
# Preprocess first (README: Preprocessing). Resumes from $SAVE automatically (--load = --save).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-data/my_text_document}
VOCAB=${VOCAB:-tests/data/gpt2-vocab.json}
MERGES=${MERGES:-tests/data/gpt2-merges.txt}
SAVE=${SAVE:-runs/gpt2-125m}
# --log_level error: without the launcher's INFO lines and "Unable to find hostfile" (one node needs none)
LAUNCHER=${LAUNCHER:-deepspeed --log_level error --num_gpus $NUM_GPUS --master_port $MASTER_PORT}

$LAUNCHER pretrain_gpt.py \
    --num-layers 12 --hidden-size 768 --num-attention-heads 12 \
    --seq-length 1024 --max-position-embeddings 1024 \
    --position-embedding-type learned_absolute --normalization LayerNorm \
    --hidden-dropout 0.0 --attention-dropout 0.0 \
    --micro-batch-size 16 --global-batch-size 512 \
    --train-tokens 300000000000 \
    --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-tokens 375000000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --zero-stage 1 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --data-path "$DATA" --split 989,10,1 \
    --save "$SAVE" --load "$SAVE" --save-interval 2000 --save-total-limit 5 \
    --eval-interval 1000 --eval-iters 20 --log-interval 10 \
    --tensorboard-dir "$SAVE/tensorboard" \
    "$@"
