#!/usr/bin/env bash
# GPT-3 XL (1.3B: 24 layers, hidden 2048, 16 heads, seq 2048) on one or more nodes: ZeRO-1 data
# parallel, bf16, activation checkpointing, 1M-token batches (512 x 2048), GPT-3 paper lr 2e-4.
# On 8 x 80 GB GPUs no tensor parallelism is needed; add --tensor-model-parallel-size 2 on 40 GB parts.
#
#   DATA=data/my_text_document NUM_GPUS=8 bash examples/pretrain_gpt_1.3b.sh [more flags]
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-data/my_text_document}
VOCAB=${VOCAB:-tests/data/gpt2-vocab.json}
MERGES=${MERGES:-tests/data/gpt2-merges.txt}
SAVE=${SAVE:-runs/gpt-1.3b}
# --log_level error: without the launcher's INFO lines and "Unable to find hostfile" (one node needs none)
LAUNCHER=${LAUNCHER:-deepspeed --log_level error --num_gpus $NUM_GPUS --master_port $MASTER_PORT}

$LAUNCHER pretrain_gpt.py \
    --model-preset gpt2-1.3b \
    --seq-length 2048 --max-position-embeddings 2048 \
    --hidden-dropout 0.0 --attention-dropout 0.0 \
    --micro-batch-size 4 --global-batch-size 512 \
    --train-tokens 300000000000 \
    --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-tokens 375000000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
    --bf16 --zero-stage 1 --checkpoint-activations \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --data-path "$DATA" --split 989,10,1 \
    --save "$SAVE" --load "$SAVE" --save-interval 1000 --save-total-limit 3 \
    --eval-interval 1000 --eval-iters 20 --log-interval 10 \
    --tensorboard-dir "$SAVE/tensorboard" \
    "$@"
