#!/usr/bin/env bash
# Llama-2 7B shape (32 layers, hidden 4096, 32 heads, SwiGLU 11008, RMSNorm, RoPE, untied head, no
# biases) on 8 GPUs per node: tensor parallel 2 with sequence parallelism, ZeRO-1 over the data-parallel
# ranks, bf16, activation checkpointing, 4M-token batches (1024 x 4096), Llama-2's optimizer settings.
# The same run as YAML: examples/llama_7b.yaml (`pretrain_gpt.py --config examples/llama_7b.yaml`).
#
#   DATA=data/my_text_document TOKENIZER_MODEL=tokenizer.model NUM_GPUS=8 bash examples/pretrain_llama_7b.sh
# Across nodes: slurm/pretrain_multinode.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-data/my_text_document}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-tokenizer.model}
SAVE=${SAVE:-runs/llama-7b}
# --log_level error: without the launcher's INFO lines and "Unable to find hostfile" (one node needs none)
LAUNCHER=${LAUNCHER:-deepspeed --log_level error --num_gpus $NUM_GPUS --master_port $MASTER_PORT}

$LAUNCHER pretrain_gpt.py \
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 \
    --seq-length 4096 --max-position-embeddings 4096 \
    --position-embedding-type rope --rotary-base 10000 --normalization RMSNorm --norm-epsilon 1e-5 \
    --swiglu --disable-bias-linear --untie-embeddings-and-output-weights \
    --hidden-dropout 0.0 --attention-dropout 0.0 --init-method-std 0.02 \
    --tensor-model-parallel-size 2 --sequence-parallel \
    --micro-batch-size 1 --global-batch-size 1024 \
    --train-tokens 2000000000000 \
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 \
    --bf16 --zero-stage 1 --checkpoint-activations \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --data-path "$DATA" --split 989,10,1 \
    --save "$SAVE" --load "$SAVE" --save-interval 500 --save-total-limit 3 \
    --eval-interval 1000 --eval-iters 10 --log-interval 10 \
    --tensorboard-dir "$SAVE/tensorboard" \
    "$@"
