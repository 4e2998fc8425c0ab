"""Quiet by default: the libraries' lines that alarm without cause, hidden at their source; `--verbose` shows them.

Each one is named here with why it is harmless (seen on a CPU run of `make demo` or a LoRA run):
  "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
      DeepSpeed, once per process that imports it, when it has to guess: `deepspeed_accelerator_from_torch`
      sets DS_ACCELERATOR=cpu when torch sees no GPU, so nothing is guessed (the launcher's own processes
      inherit it from the shell: examples/demo.sh exports it).
  "FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated"
      torch 2.13 about DeepSpeed 0.19's ZeRO gather, once per rank: filtered by category and message.
  "Failed to load .../torchao/_C_mxfp8...so", "... _C_cutlass_90a.abi3.so"
      torchao's optional compiled kernels (MX-FP8, CUTLASS sm90a) on import (peft and transformers import it),
      built for another Python or GPU; megaclm uses neither (fp8: torch._scaled_mm; QLoRA: NF4/int8 tensors).
  "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile ..."
      torch's pytree about torchao's register_constant calls on import.
  DeepSpeed's INFO log in the ranks: WARNING and above only (DeepSpeed 0.19's own default; --verbose lowers it).
  megaclm's own INFO lines (the datasets line, "waiting for another process to build ..."): rank 0 only;
      warnings and errors still come from every rank (they may be a rank's own).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import MutableMapping

_WARNINGS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)
# (logger, a pattern of the message) for messages emitted through `logging`
_RECORDS = (("torchao", r"^Failed to load \S*/torchao/_C\w*\.\S*\.so: "),
            ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile"))


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# One instance each: logging's addFilter ignores a filter already added, so every call is idempotent.
_DROPS = tuple((logging.getLogger(name), _DropKnown(pattern)) for name, pattern in _RECORDS)


def deepspeed_accelerator_from_torch(env: MutableMapping[str, str] = os.environ) -> None:
    """DS_ACCELERATOR=cpu when torch sees no GPU and nobody chose one; call before DeepSpeed is imported."""
    if "DS_ACCELERATOR" in env:
        return
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"


def hide_known_noise() -> None:
    """Hide the library lines listed above; `show_all` undoes it."""
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger, drop in _DROPS:
        logger.addFilter(drop)


def info_from_rank_zero(rank: int) -> None:
    """megaclm's INFO lines from rank 0 only (every rank logs the same start-up facts)."""
    if rank != 0:  # the level of the tree's root: its children (megaclm.data, ...) inherit it
        logging.getLogger("megaclm").setLevel(logging.WARNING)


def show_all() -> None:
    """--verbose: every line as the libraries print it, DeepSpeed's INFO log included."""
    for category, message in _WARNINGS:
        warnings.filterwarnings("default", message=message, category=category)
    for logger, drop in _DROPS:
        logger.removeFilter(drop)
    logging.getLogger("megaclm").setLevel(logging.INFO)
    deepspeed_log = logging.getLogger("DeepSpeed")
    for target in (deepspeed_log, *deepspeed_log.handlers):
        target.setLevel(logging.INFO)


def entry_point() -> None:
    """For a tool's first lines, before DeepSpeed is imported: the accelerator chosen, the known noise hidden."""
    deepspeed_accelerator_from_torch()
    hide_known_noise()
