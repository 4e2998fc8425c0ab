"""One sample's sequence split across the seq axis (megaclm.parallel.state): which tokens a rank holds,
gathering per-token ids back, and ring attention (context parallelism).

Token layout of a sequence of T tokens over n = seq_size ranks (c = chunk length):

    Ulysses (contiguous)    rank r holds tokens [r T/n, (r+1) T/n)
    ring (load-balanced)    the sequence is cut into 2n chunks of c = T/2n; rank r holds chunks r and 2n-1-r,
                            e.g. n=2, T=8: rank 0 tokens 0 1 6 7, rank 1 tokens 2 3 4 5

Under a causal mask chunk j attends to chunks 0..j, so the contiguous split would give the last rank n times
the first one's work; pairing chunk r with 2n-1-r gives every rank 2n+1 (query chunk, key chunk) blocks
(Megatron-LM's and torchtitan's context-parallel layout). Position ids travel with the tokens, so RoPE
sees the global positions.

Ring attention (`ring_attention`): every rank's keys/values are all-gathered once per layer (backward: the
key/value gradients are reduce-scattered back), then each local query chunk visits the key chunks that
are not wholly in its future, one (c x c) block at a time, and the blocks' partial outputs are merged with
the online-softmax rule (running log-sum-exp). The attention scores held for backward are this rank's
2n+1 blocks: 1/n of the causal (T x T) matrix. The CPU/gloo implementation gathers K/V instead of
passing them around a ring with send/recv (same arithmetic; overlapping the transfer with the block
compute is what the ring buys on GPUs).
"""
import math

import torch
import torch.distributed as dist

from megaclm.parallel.mappings import all_gather, gather_from_sp

# Masked scores: a finite floor, not -inf, so a block row with no allowed key has a finite log-sum-exp;
# the merge then gives it weight exp(floor - lse) = 0 against any real block (every query sees itself).
_MASKED = -1e30


def sequence_index(seq_length: int, size: int, rank: int, load_balanced: bool,
                   device: torch.device | None = None) -> torch.Tensor:
    """(seq_length / size,) int64: the global token indices rank `rank` of `size` holds, in its local order."""
    if size == 1:
        return torch.arange(seq_length, device=device)
    if not load_balanced:
        local = seq_length // size
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    c = seq_length // (2 * size)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c, device=device)])


def shard_sequence(x: torch.Tensor, size: int, rank: int, load_balanced: bool) -> torch.Tensor:
    """(B, T, ...) -> (B, T/size, ...): this rank's tokens (the data loader's cut of a micro-batch)."""
    if size == 1:
        return x
    if x.size(1) % (size * (2 if load_balanced else 1)):
        raise ValueError(f"sequence length {x.size(1)} does not split into {size} ranks"
                         f"{' x 2 load-balanced chunks' if load_balanced else ''}")
    return x.index_select(1, sequence_index(x.size(1), size, rank, load_balanced, x.device))


def gather_sequence(x: torch.Tensor, group, load_balanced: bool) -> torch.Tensor:
    """(B, T/n, ...) per-token ids (no gradient) of every rank of `group` -> (B, T, ...) in global token order."""
    n = 1 if group is None else dist.get_world_size(group)
    if n == 1:
        return x
    gathered = all_gather(x, 1, group)  # rank-major: rank 0's tokens, rank 1's, ...
    if not load_balanced:
        return gathered
    T = gathered.size(1)
    order = torch.cat([sequence_index(T, n, r, True, x.device) for r in range(n)])  # global index of each slot
    return torch.empty_like(gathered).index_copy_(1, order, gathered)


def _block(q, k, v, allowed, scale):
    """One (query chunk, key chunk) block. q (B, nkv, rep, c, hd), k/v (B, nkv, 1, ck, hd), allowed bool
    broadcastable to (B, 1, 1, c, ck) or None -> fp32 out (B, nkv, rep, c, hd), lse (B, nkv, rep, c)."""
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nkv, rep, c, ck)
    if allowed is not None:
        s = s.masked_fill(~allowed, _MASKED)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[..., None]) @ v.float(), lse


def _merge(out, lse, out_b, lse_b):
    """Online softmax: combine two partial attentions over disjoint key sets."""
    new = torch.logaddexp(lse, lse_b)
    return out * torch.exp(lse - new)[..., None] + out_b * torch.exp(lse_b - new)[..., None], new


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *, token_index: torch.Tensor,
                   key_index: torch.Tensor, document_ids: torch.Tensor | None, key_document_ids: torch.Tensor | None,
                   window: int | None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence's keys.

    q (B, Tl, nh, hd), k and v (B, Tl, nkv, hd): this rank's 2 load-balanced chunks (Tl = 2c).
    token_index (Tl,): their global indices; key_index (n Tl,): the global indices of the all-gathered
    keys (rank-major), both made of ascending runs of c consecutive indices (sequence_index's chunks);
    document_ids (B, Tl) / key_document_ids (B, n Tl) or None; window: sliding window.
    Returns (B, Tl, nh, hd) in q's dtype.
    """
    B, Tl, nh, hd = q.shape
    nkv = k.size(2)
    rep, c, scale = nh // nkv, Tl // 2, 1.0 / math.sqrt(hd)
    k_all = gather_from_sp(k, group).transpose(1, 2)[:, :, None]  # (B, nkv, 1, n Tl, hd); bwd: reduce-scatter
    v_all = gather_from_sp(v, group).transpose(1, 2)[:, :, None]
    qg = q.transpose(1, 2).reshape(B, nkv, rep, Tl, hd)  # query head j uses key/value head j // rep
    # Each chunk's first and last index, on the host in one transfer: which blocks to skip or leave unmasked
    # is decided without a host sync per block.
    bounds = torch.cat([token_index.view(2, c), key_index.view(-1, c)])[:, [0, -1]].tolist()
    q_bounds, k_bounds = bounds[:2], bounds[2:]
    outs = []
    for a in range(2):  # each local query chunk
        qa, qi = qg[..., a * c:(a + 1) * c, :], token_index[a * c:(a + 1) * c]
        (q_first, q_last), out, lse = q_bounds[a], None, None
        for b, (k_first, k_last) in enumerate(k_bounds):  # each key chunk of the gathered sequence
            if k_first > q_last or (window is not None and q_first - k_last >= window):
                continue  # wholly in the future, or wholly outside the window: nothing to attend
            allowed = None  # wholly in the past and within the window: every pair attends
            if k_last > q_first or (window is not None and q_last - k_first >= window):
                rel = qi[:, None] - key_index[None, b * c:(b + 1) * c]  # (c, c)
                allowed = rel >= 0
                if window is not None:
                    allowed = allowed & (rel < window)
            if document_ids is not None:
                same = (document_ids[:, a * c:(a + 1) * c, None] == key_document_ids[:, None, b * c:(b + 1) * c])
                allowed = same if allowed is None else same & allowed  # (B, c, c)
            if allowed is not None and allowed.dim() == 3:
                allowed = allowed[:, None, None]  # (B, 1, 1, c, c)
            out_b, lse_b = _block(qa, k_all[..., b * c:(b + 1) * c, :], v_all[..., b * c:(b + 1) * c, :], allowed,
                                  scale)
            out, lse = (out_b, lse_b) if out is None else _merge(out, lse, out_b, lse_b)
        outs.append(out)
    y = torch.cat(outs, dim=3).reshape(B, nh, Tl, hd)
    return y.transpose(1, 2).to(q.dtype)  # (B, Tl, nh, hd)
