"""QLoRA: the frozen base's block linears stored quantized (`--base-quantization nf4|int8`), on torchao's tensors.

    nf4   torchao NF4Tensor (Dettmers et al. 2023): 4-bit NormalFloat codes in blocks of 64 elements, each
          block's absmax scale itself quantized to int8 in groups of up to 256 blocks ("double quantization").
          0.5 byte per element + 1 byte per 64 + a float per 64 x 256: ~0.52 byte per element.
    int8  torchao Int8Tensor, symmetric, one float32 scale per output row: 1 byte per element + 5 bytes per row.

What is quantized: the weight of qkv, proj, fc1 and fc2 in every transformer layer (the dense MLP and an MoE
layer's shared expert), adapted or not - all frozen. The embedding, an untied output layer (as PEFT and
bitsandbytes leave lm_head), norms, biases, routed experts and the adapters keep the training dtype.

Each rank quantizes its own tensor-parallel shard, after the base weights are loaded. The weight Parameter
becomes a non-persistent buffer holding the quantized tensor: DeepSpeed (which only ever held it as frozen) no
longer sees it, checkpoints keep holding the adapters only, and the matmul (`linear`, as megaclm.model.fp8
swaps it) dequantizes it to the input's dtype for the forward and again in backward for the input gradient, so
only the quantized copy lives between them. `fake_quantize` gives the dequantized weights that training used,
from the unquantized base and the run's TP size: what an export merges the adapters into.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaclm.config.model import ModelConfig
from megaclm.model.sharding import shard_state_dict, unshard_state_dicts
from megaclm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megaclm.utils.errors import UserError

BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's block sizes (torchao's to_nf4 defaults)
MIN_TORCHAO = "0.18"  # the version these paths were tested with (pyproject's qlora extra)


def _torchao() -> Any:
    """torchao's quantized tensor classes; imported only for a quantized run (seconds of import, and lines about
    CUDA libraries a CPU build lacks, which say nothing about QLoRA: kept below warnings)."""
    if importlib.util.find_spec("torchao") is None:
        raise UserError("--base-quantization needs torchao: pip install 'megaclm[qlora]' (or pip install torchao)")
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError as e:  # older torchao kept them elsewhere (torchao.dtypes.nf4tensor)
        raise UserError(f"--base-quantization needs torchao >= {MIN_TORCHAO} ({e}): pip install 'megaclm[qlora]'")
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return to_nf4, Int8Tensor, PerRow


def quantize_weight(weight: torch.Tensor, method: str) -> torch.Tensor:
    """`weight` (out, in) as torchao's nf4 or int8 tensor (same shape and dtype as seen from outside)."""
    to_nf4, int8_tensor, per_row = _torchao()
    weight = weight.detach().contiguous()
    if method == "int8":
        return int8_tensor.from_hp(weight, per_row())
    if weight.numel() % NF4_BLOCK:
        raise UserError(f"--base-quantization nf4: a weight of shape {tuple(weight.shape)} (one tensor-parallel "
                        f"shard) is not a whole number of {NF4_BLOCK}-element blocks; use --base-quantization int8")
    # Scales are double-quantized in groups of 256 blocks; a small shard takes the largest group that divides it.
    return to_nf4(weight, NF4_BLOCK, math.gcd(weight.numel() // NF4_BLOCK, NF4_SCALER_BLOCK))


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if hasattr(weight, "get_original_weight"):  # NF4Tensor
        return weight.get_original_weight().to(dtype)
    return weight.dequantize(dtype)


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W quantized and frozen: W dequantized for each matmul, never saved dequantized.
    backward: dx = dy W only (W and b take no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # the quantized tensor (save_for_backward takes plain tensors' versions)
        return F.linear(x, dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy.matmul(dequantize(ctx.weight, dy.dtype)), None, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear's signature for a quantized `weight`: (..., in) -> (..., out)."""
    return _DequantizedLinear.apply(x, weight, bias)


def quantized_bytes(weight: torch.Tensor) -> int:
    """Bytes a torchao quantized tensor holds (its inner tensors)."""
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names)


def quantize_base(model: nn.Module, method: str) -> tuple[int, int]:
    """Quantize every block linear's weight of `model` (GPTModel or a pipeline stage) in place; returns (bytes
    before, bytes after) of those weights on this rank."""
    before = after = 0
    for name, module in model.named_modules():
        if not (isinstance(module, (ColumnParallelLinear, RowParallelLinear))
                and name.rsplit(".", 1)[-1] in BLOCK_LINEARS):
            continue
        weight = module.weight
        quantized = quantize_weight(weight, method)
        before += weight.numel() * weight.element_size()
        after += quantized_bytes(quantized)
        del module.weight  # the Parameter: frozen, in no optimizer group
        module.register_buffer("weight", quantized, persistent=False)
        module.linear = quantized_linear
    return before, after


def fake_quantize(sd: Mapping[str, torch.Tensor], config: ModelConfig, method: str, tp: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full state dict `sd` with each block linear's weight replaced by what a run at tensor-parallel size
    `tp` in `dtype` trained against: every TP shard cast to `dtype` (as the engine held it when it was quantized),
    quantized, dequantized, cast back to the state dict's dtype, and the shards joined again."""
    def is_block_weight(key: str) -> bool:
        return key.endswith(".weight") and key.rsplit(".", 2)[-2] in BLOCK_LINEARS

    def round_trip(shard: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: dequantize(quantize_weight(v.to(dtype), method), v.dtype) if is_block_weight(k) else v
                for k, v in shard.items()}

    shards = [round_trip(shard_state_dict(dict(sd), config, tp, rank)) for rank in range(tp)]
    return unshard_state_dicts(shards, config) if tp > 1 else shards[0]


def apply_to(model: nn.Module, method: str, log: Callable[[str], None] | None = None) -> None:
    """quantize_base with the memory saved in one log line (rank 0 passes `log`)."""
    before, after = quantize_base(model, method)
    if log is not None:
        log(f"QLoRA: frozen block linears stored in {method}: {before / 2**20:.4g} MiB -> {after / 2**20:.4g} MiB "
            "on this rank")
