"""FP8 training of the transformer blocks' linears with torchao's float8 (`--fp8-format`, `--fp8-recipe`).

The weights stay in their training dtype (bf16 with fp32 masters): at each matmul of qkv, proj, fc1 and
fc2 the input, weight and output-gradient are cast to float8 with a dynamic scale (one per tensor:
"tensorwise", or one per row: "rowwise") and multiplied by `torch._scaled_mm`, as torchao's Float8Linear
does. Formats are Megatron's: "e4m3" everywhere, or "hybrid" (e4m3 forward, e5m2 for gradients, their
wider range). The embedding and the output layer stay in bf16 (torchtitan does the same).

Column/RowParallelLinear are not nn.Linear, so instead of torchao's module swap each one gets its
`linear` replaced by `Float8Matmul` (the matmul only: the tensor-parallel communication around it is
unchanged, and the state dict too - checkpoints are the same with and without FP8). `emulate=True`
(tests) runs torchao's emulation on any device; real runs need an NVIDIA GPU of compute capability 8.9+.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from megaclm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megaclm.utils.errors import UserError

if TYPE_CHECKING:  # torchao is optional: imported where fp8 is used
    from torchao.float8 import Float8LinearConfig

MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first with FP8 tensor cores
BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")


def fp8_unavailable() -> str | None:
    """Why FP8 training cannot run in this process (None if it can)."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install torchao)"
    if not torch.cuda.is_available():
        return "there is no CUDA GPU"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return (f"the GPU ({torch.cuda.get_device_name()}) has compute capability {cap[0]}.{cap[1]}; FP8 matmuls need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper or newer)")
    return None


def check_fp8(fp8_format: str | None) -> None:
    """Refuse --fp8-format where it cannot run, with the reason; a no-op when FP8 is off."""
    reason = None if fp8_format is None else fp8_unavailable()
    if reason is not None:
        raise UserError(f"--fp8-format {fp8_format}: {reason}; drop the --fp8-* flags and train in --bf16")


def float8_config(fp8_format: str, recipe: str, emulate: bool = False) -> Float8LinearConfig:
    """torchao's Float8LinearConfig for a Megatron format name and a scaling recipe."""
    if importlib.util.find_spec("torchao") is None:
        raise UserError("--fp8-format needs torchao: pip install torchao")
    # torchao is imported only when FP8 is on: its import takes seconds and logs a line per CUDA library it lacks.
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.config import e4m3_dtype
    base = Float8LinearConfig.from_recipe_name(recipe)  # tensorwise: e4m3 / e5m2 gradients; rowwise: e4m3 all
    grad_dtype = e4m3_dtype if fp8_format == "e4m3" else torch.float8_e5m2
    go = dataclasses.replace(base.cast_config_grad_output, target_dtype=grad_dtype)
    return dataclasses.replace(base, cast_config_grad_output=go, cast_config_grad_output_for_grad_weight=go,
                               emulate=emulate)


class Float8Matmul(nn.Module):
    """F.linear's signature, (x (..., in), weight (out, in), bias) -> (..., out), with float8 matmuls."""

    def __init__(self, config: Float8LinearConfig):
        from torchao.float8 import LinearMMConfig, ScaledMMConfig
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        super().__init__()
        self.config, self._matmul = config, matmul_with_hp_or_float8_args
        mm = [ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)
              for g in (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)]
        self.mm_config = LinearMMConfig(*mm)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self._matmul.apply(x, weight.t(), self.mm_config, self.config)
        return y if bias is None else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        go = self.config.cast_config_grad_output
        return f"weight/input {self.config.cast_config_weight.short_str()}, grad {go.short_str()}"


def convert_to_fp8(model: nn.Module, fp8_format: str, recipe: str, emulate: bool = False) -> list[str]:
    """Give each block linear (qkv, proj, fc1, fc2) a float8 matmul; returns the converted module names."""
    config = float8_config(fp8_format, recipe, emulate)
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
            module.linear = Float8Matmul(config)
            converted.append(name)
    return converted
