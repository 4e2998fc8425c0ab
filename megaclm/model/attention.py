"""Core attention, softmax(q k^T / sqrt(hd) + mask) v, by the cheapest path the inputs allow.

GPTModel builds one `AttentionInputs` per forward (`attention_inputs`, shared by its layers); each
layer then calls `core_attention`. What the mask is made of, and the path that computes it:

    plain causal                      SDPA with is_causal (flash / cuDNN / memory-efficient kernels)
    documents (--reset-attention-mask) on CUDA: flash varlen (torch.nn.attention.varlen), every
                                      document of every sample one variable-length sequence, no mask
                                      at all; elsewhere (CPU, ALiBi, attention dropout): a (B, 1, T, T)
                                      bool mask built here once per forward from the document ids
    sliding window                    the same two paths (varlen takes the window natively)
    ALiBi                             a (B, nh, T, T) float bias (-inf where masked)

`document_ids` (B, T) int: tokens of one sample with equal ids belong to one document and may attend
to each other (causally); Megatron's --reset-attention-mask, where a document ends with its eod.
The data never carries a dense (T, T) mask.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megaclm.config.model import ModelConfig
from megaclm.model.positions import alibi_slopes

try:  # torch >= 2.10, CUDA only: FlashAttention over packed variable-length sequences
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer of one forward needs besides q, k, v. Exactly one way is set:
    `causal` alone (plain causal), `mask` (bool, True = attend, or a float bias), or `cu_seqlens`."""

    causal: bool = True
    mask: torch.Tensor | None = None  # (B|1, 1|nh, T, T)
    cu_seqlens: torch.Tensor | None = None  # (N + 1,) int32 offsets of the N documents in the flat B*T tokens
    max_seqlen: int = 0
    window: int | None = None  # varlen only (the dense mask already holds it)


def varlen_available(device: torch.device) -> bool:
    return varlen_attn is not None and device.type == "cuda"


def document_offsets(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) document ids -> cumulative offsets (N + 1,) int32 of the documents in the flattened
    (B*T) token order and the longest document; a row boundary always starts a new document."""
    B, T = document_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=document_ids.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.nonzero(starts.flatten()).flatten()  # (N,) one host sync per forward, shared by all layers
    cu = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


class AttentionMasker:
    """`(position_ids, document_ids, dtype, dropout_p) -> AttentionInputs` for one model on one TP rank."""

    def __init__(self, config: ModelConfig, tp_size: int = 1, tp_rank: int = 0):
        self.window = config.window_size
        self.slopes = None
        if config.position_embedding_type == "alibi":  # the slopes of this rank's heads
            local = config.num_attention_heads // tp_size
            self.slopes = alibi_slopes(config.num_attention_heads)[tp_rank * local:(tp_rank + 1) * local]

    def __call__(self, position_ids: torch.Tensor, document_ids: torch.Tensor | None, dtype: torch.dtype,
                 dropout_p: float = 0.0, allow_varlen: bool = True) -> AttentionInputs:
        if document_ids is None and self.window is None and self.slopes is None:
            return AttentionInputs()
        if (allow_varlen and self.slopes is None and dropout_p == 0.0 and varlen_available(position_ids.device)):
            if document_ids is None:
                document_ids = torch.zeros_like(position_ids)
            cu, longest = document_offsets(document_ids)
            return AttentionInputs(causal=False, cu_seqlens=cu, max_seqlen=longest, window=self.window)
        return AttentionInputs(causal=False, mask=dense_mask(position_ids, document_ids, self.window,
                                                             self.slopes, dtype))


def dense_mask(position_ids: torch.Tensor, document_ids: torch.Tensor | None, window: int | None,
               slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(B|1, 1, T, T) bool mask (True = may attend), or with ALiBi slopes a (B, nh, T, T) `dtype` bias."""
    T = position_ids.size(1)
    i = torch.arange(T, device=position_ids.device)
    rel = i[:, None] - i[None, :]  # (T, T): query index - key index
    allowed = rel >= 0
    if window is not None:
        allowed = allowed & (rel < window)
    allowed = allowed[None, None]  # (1, 1, T, T)
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])  # (B, 1, T, T)
    if slopes is None:
        return allowed
    # ALiBi: -slope * distance, the distance from the position ids so document resets restart it.
    pos = position_ids.float()
    dist = (pos[:, :, None] - pos[:, None, :]).abs()[:, None]  # (B, 1, T, T)
    bias = -slopes.to(position_ids.device)[None, :, None, None] * dist  # (B, nh, T, T)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, *,
                   dropout_p: float, backend: str, softmax) -> torch.Tensor:
    """q (B, T, nh, hd), k and v (B, T, nkv, hd) -> (B, T, nh, hd).

    backend: "sdpa" (torch picks the kernel), "flash" (SDPA restricted to its flash kernel where the
    inputs allow one: plain causal, no dropout mask), "unfused" (explicit QK^T, `softmax`, V).
    """
    B, T, nh, hd = q.shape
    nkv = k.size(2)
    scale = 1.0 / math.sqrt(hd)
    if inputs.cu_seqlens is not None:
        left = -1 if inputs.window is None else inputs.window - 1
        y = varlen_attn(q.reshape(B * T, nh, hd), k.reshape(B * T, nkv, hd), v.reshape(B * T, nkv, hd),
                        inputs.cu_seqlens, inputs.cu_seqlens, inputs.max_seqlen, inputs.max_seqlen,
                        scale=scale, window_size=(left, 0), enable_gqa=nkv != nh)
        return y.view(B, T, nh, hd)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
    if backend == "unfused":
        rep = nh // nkv  # grouped-query: each kv head serves `rep` consecutive query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = inputs.mask
        if inputs.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        probs = softmax(q @ k.transpose(-2, -1), mask, scale)
        y = F.dropout(probs, dropout_p) @ v
    else:
        # torch's CPU flash kernel has no dropout; there (and with a mask) SDPA picks the kernel itself.
        flash = backend == "flash" and inputs.mask is None and (q.is_cuda or dropout_p == 0.0)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, dropout_p=dropout_p,
                                               is_causal=inputs.causal, scale=scale, enable_gqa=nkv != nh)
    return y.transpose(1, 2)  # (B, T, nh, hd)
