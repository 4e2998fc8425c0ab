"""Prove a parallel layout before the big run: a shrunk copy of the run at its layout against one rank.

    python tools/check_layout.py --world-size 8 --config run.yaml
    LAUNCHER="python tools/check_layout.py --world-size 8" bash examples/pretrain_llama_7b.sh

How the model is shrunk, what runs and the tolerances: megaclm.training.layout_check. Exit 0 when the layout
matches the reference, 1 when it does not (or crashes), 2 for bad input.
"""
from megaclm.logging.quiet import entry_point

entry_point()  # before DeepSpeed is imported: it would guess the accelerator, and warn that it did

from megaclm.training.layout_check import main  # noqa: E402
from megaclm.utils.errors import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main(main)
