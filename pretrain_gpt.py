"""Pretrain a GPT-family model on DeepSpeed, Megatron-style.

    deepspeed --num_gpus 8 pretrain_gpt.py --num-layers 24 --hidden-size 2048 ... --data-path data/corpus_text_document
    deepspeed --num_gpus 8 pretrain_gpt.py --config examples/llama_7b.yaml --train-iters 1000
    python pretrain_gpt.py --config run.yaml --validate-only --world-size 64

Flags and YAML: megaclm.config; the run itself: megaclm.training.pretrain.
"""
from megaclm.utils import signals

# Before torch and DeepSpeed load (seconds): from here on SIGTERM/SIGUSR1 stop the run at a safe point.
signals.install()

from megaclm.logging.quiet import deepspeed_accelerator_from_torch  # noqa: E402

deepspeed_accelerator_from_torch()  # before DeepSpeed is imported: it would guess, and warn that it did

from megaclm.training.pretrain import main  # noqa: E402
from megaclm.utils.errors import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main(main)
