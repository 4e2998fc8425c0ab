"""Positions: RoPE frequencies (with Llama-3 scaling), ALiBi slopes, and the attention mask/bias.

`attention_bias` turns (causal + sliding window + the caller's document mask + ALiBi) into what
torch's scaled_dot_product_attention takes: None with is_causal=True in the plain causal case (the fast
path), else a bool mask (True = attend) or, with ALiBi, a float bias that is -inf where masked.
`AttentionMask` binds the model's part of that (window, this rank's ALiBi slopes); GPTModel calls it
once per forward and shares the result across its layers.
"""
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


def attention_bias(seq_len: int, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   window_size: int | None, slopes: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """(mask_or_bias, is_causal) for SDPA over a (B, T) batch.

    attention_mask: None or (B, 1, T, T) bool, True = may attend (ANDed with causality).
    slopes: this rank's ALiBi slopes (nh_local,) or None. Returns a (B|1, 1, T, T) bool mask, a
    (B, nh_local, T, T) `dtype` bias, or (None, True) for plain causal attention.
    """
    if attention_mask is None and window_size is None and slopes is None:
        return None, True
    device = position_ids.device
    i = torch.arange(seq_len, device=device)
    rel = i[:, None] - i[None, :]  # (T, T): query index - key index
    allowed = rel >= 0
    if window_size is not None:
        allowed = allowed & (rel < window_size)
    allowed = allowed[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()
    if slopes is None:
        return allowed, False
    # ALiBi: -slope * distance, distance from the position ids so document resets restart it.
    pos = position_ids.float()
    dist = (pos[:, :, None] - pos[:, None, :]).abs()[:, None]  # (B, 1, T, T)
    bias = -slopes.to(device)[None, :, None, None] * dist  # (B, nh, T, T)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype), False


class AttentionMask:
    """`(position_ids, attention_mask, dtype) -> (mask_or_bias, is_causal)` for one model on one TP rank."""

    def __init__(self, config: ModelConfig, tp_size: int = 1, tp_rank: int = 0):
        self.window = config.window_size
        self.slopes = None
        if config.position_embedding_type == "alibi":  # the slopes of this rank's heads
            local = config.num_attention_heads // tp_size
            self.slopes = alibi_slopes(config.num_attention_heads)[tp_rank * local:(tp_rank + 1) * local]

    def __call__(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        return attention_bias(position_ids.size(1), position_ids, attention_mask, self.window, self.slopes, dtype)
