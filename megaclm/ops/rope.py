"""Rotary position embedding reference (rotate-half layout of GPT-NeoX / Llama / Megatron).

    rope(q, k, inv_freq, position_ids) -> (q_rot, k_rot)

q: (B, T, nh, hd), k: (B, T, nkv, hd), inv_freq: (rot/2,) fp32, position_ids: (B, T) int64.
The first `rot = 2 * len(inv_freq)` dims of each head are rotated, pairing dim i with dim i + rot/2 by
the angle position * inv_freq[i]; the remaining hd - rot dims pass through (partial rotary).
Angles are computed in fp32; outputs keep the inputs' dtype.
"""
import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = 2 * cos.size(-1)
    xr, rest = x[..., :rot].float(), x[..., rot:]
    x1, x2 = xr.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.numel() else out


def rope_reference(q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor,
                   position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = position_ids.float().unsqueeze(-1) * inv_freq.float()  # (B, T, rot/2)
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # (B, T, 1, rot/2): broadcast over heads
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
