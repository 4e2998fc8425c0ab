"""Positions: RoPE frequencies (with Llama-3 scaling) and ALiBi slopes (the masks: megaclm.model.attention)."""
import math

import torch

from megaclm.config.model import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(rotary_dim/2,) fp32 inverse frequencies theta^(-2i/rot), optionally Llama-3.1 scaled."""
    rot = config.rotary_dim
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    if config.use_rope_scaling:
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
        factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen < old_len / high, inv_freq,
                               torch.where(wavelen > old_len / low, inv_freq / factor, scaled))
    return inv_freq.float()


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(num_heads,) ALiBi slopes (Press et al.): a geometric series; for n not a power of two, the
    series of the next lower power of two followed by every other slope of the next higher one."""
    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest)
    if closest < num_heads:
        slopes += powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
