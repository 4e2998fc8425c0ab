"""The chunked linear cross-entropy with the output weight split by vocabulary over 2 gloo ranks
equals the unsharded loss and gradients (megaclm.ops.chunked_ce, CPU row functions; the CUDA row
kernels plug into the same code and are checked against the same formulas in tests/gpu)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaclm.ops.chunked_ce import chunked_linear_cross_entropy
from mp_harness import run_ranks

N, H, V = 11, 16, 40  # V splits into two shards of 20


def _worker(rank, world_size):
    torch.manual_seed(0)  # same full tensors on every rank
    hidden, weight = torch.randn(N, H), torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, (N,))
    labels[:3] = torch.tensor([0, V - 1, -100])  # first row of shard 0, last of shard 1, ignored
    grad_loss = torch.randn(N)

    full_h, full_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = F.cross_entropy(full_h @ full_w.t(), labels, reduction="none")
    want.backward(grad_loss)

    shard = V // world_size
    h = hidden.clone().requires_grad_()
    w = weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    got = chunked_linear_cross_entropy(h, w, labels, chunk_size=4, group=dist.group.WORLD)
    got.backward(grad_loss)
    return {
        "loss": (got - want).abs().max().item(),
        "grad_hidden": (h.grad - full_h.grad).abs().max().item(),
        "grad_weight": (w.grad - full_w.grad[rank * shard:(rank + 1) * shard]).abs().max().item(),
        "ignored_loss": got[2].item(),
    }


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(2, _worker, timeout=300)


def test_vocab_split_loss_and_grads_equal_unsharded(ranks):
    for rank, r in enumerate(ranks):
        assert r["loss"] < 1e-5 and r["grad_hidden"] < 1e-5 and r["grad_weight"] < 1e-5, (rank, r)
        assert r["ignored_loss"] == 0.0
