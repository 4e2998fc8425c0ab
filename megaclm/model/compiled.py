"""`--torch-compile`: torch.compile of each transformer block, in place.

Blocks, not the whole model: each TransformerLayer is one graph (its norms, linears, attention and
activations fused by inductor), compiled once and reused by every layer of the same shape, while the
embedding, the loss, the pipeline engine's stage boundaries and the activation-recomputation wrappers
stay eager Python around them. `nn.Module.compile()` keeps the module and its state-dict keys, so
checkpoints are the same with and without compilation. Where inductor cannot run
(megaclm.ops.compile_unavailable) one line is logged and the blocks run eagerly.
"""
from typing import Iterable

import torch.nn as nn

from megaclm.logging import warn_once
from megaclm.ops import compile_unavailable


def compile_blocks(blocks: Iterable[nn.Module]) -> bool:
    """Compile each module of `blocks` in place; False (after one logged line) where inductor is unavailable."""
    reason = compile_unavailable()
    if reason is not None:
        warn_once("torch-compile-missing", f"--torch-compile: {reason}; running the transformer blocks eagerly")
        return False
    for block in blocks:
        block.compile()
    return True
