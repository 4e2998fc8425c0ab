"""The sequence split without processes: the seq axis in ParallelState (against an independent formula),
which tokens each rank holds, the config errors, and the memory model's 1/N."""
import itertools
from dataclasses import replace

import pytest
import torch

from megaclm.config.model import ModelConfig, check_parallel_shapes
from megaclm.config.parallel import ParallelConfig
from megaclm.model.flops import MemorySetup, estimate_memory, layer_activation_bytes
from megaclm.parallel.context import sequence_index, shard_sequence
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError

LAYOUTS = [(w, tp, seq, pp) for w in (2, 4, 8, 16) for tp in (1, 2) for seq in (2, 4) for pp in (1, 2)
           if w % (tp * seq * pp) == 0]


def expected_rank(tp_r, seq_r, dp_r, pp_r, tp, seq, dp):
    return ((pp_r * dp + dp_r) * seq + seq_r) * tp + tp_r


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
@pytest.mark.parametrize("world,tp,seq,pp", LAYOUTS)
def test_seq_axis_sits_between_tp_and_dp(world, tp, seq, pp, kind):
    dp = world // (tp * seq * pp)
    sizes = {"ulysses_size": seq} if kind == "ulysses" else {"context_parallel_size": seq}
    states = [ParallelState(world, r, tp, pp, **sizes) for r in range(world)]
    for tp_r, seq_r, dp_r, pp_r in itertools.product(range(tp), range(seq), range(dp), range(pp)):
        s = states[expected_rank(tp_r, seq_r, dp_r, pp_r, tp, seq, dp)]
        assert (s.tp_rank, s.cp_rank, s.dp_rank, s.pp_rank) == (tp_r, seq_r, dp_r, pp_r)
        assert s.cp_kind == kind and (s.cp_size, s.dp_size) == (seq, dp)
        assert s.tp_group_ranks == [expected_rank(t, seq_r, dp_r, pp_r, tp, seq, dp) for t in range(tp)]
        assert s.cp_group_ranks == [expected_rank(tp_r, q, dp_r, pp_r, tp, seq, dp) for q in range(seq)]
        assert s.dp_group_ranks == [expected_rank(tp_r, seq_r, d, pp_r, tp, seq, dp) for d in range(dp)]
        assert s.cp_dp_group_ranks == sorted(expected_rank(tp_r, q, d, pp_r, tp, seq, dp)
                                              for q in range(seq) for d in range(dp))
        # One replica (tp x pp) excludes the seq ranks: the grad norm must not count their copies twice.
        assert s.model_parallel_group_ranks == sorted(expected_rank(t, seq_r, dp_r, p, tp, seq, dp)
                                                      for t in range(tp) for p in range(pp))
        assert (s.get_sequence_parallel_world_size(), s.get_sequence_data_parallel_world_size(),
                s.get_data_parallel_world_size()) == (seq, seq * dp, dp)
        assert s.get_sequence_data_parallel_rank() == s.cp_dp_group_ranks.index(s.rank)


def test_without_a_split_the_layout_is_unchanged():
    s = ParallelState(8, 5, 2, 2)
    assert (s.cp_size, s.cp_rank, s.cp_kind, s.cp_group_ranks) == (1, 0, None, [5])
    assert s.cp_dp_group_ranks == s.dp_group_ranks


@pytest.mark.parametrize("n,T", [(1, 8), (2, 8), (2, 16), (4, 16), (8, 64)])
@pytest.mark.parametrize("load_balanced", [False, True])
def test_ranks_hold_disjoint_tokens_covering_the_sequence(n, T, load_balanced):
    held = [sequence_index(T, n, r, load_balanced) for r in range(n)]
    assert sorted(torch.cat(held).tolist()) == list(range(T))
    if load_balanced and n > 1:
        c = T // (2 * n)
        for r, idx in enumerate(held):  # chunks r and 2n-1-r
            assert idx.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * n - 1 - r) * c, (2 * n - r) * c))
        # Causal work (keys at or before each query) is the same on every rank.
        work = {int((idx + 1).sum()) for idx in held}
        assert len(work) == 1, work
    x = torch.arange(3 * T).view(3, T)
    assert torch.equal(shard_sequence(x, n, n - 1, load_balanced), x[:, held[-1]])


def test_example_of_the_docstring():
    assert sequence_index(8, 2, 0, True).tolist() == [0, 1, 6, 7]
    assert sequence_index(8, 2, 1, True).tolist() == [2, 3, 4, 5]


LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, position_embedding_type="rope",
             attention_dropout=0.0)


@pytest.mark.parametrize("parallel,model,match", [
    (dict(ds_sequence_parallel_size=2, context_parallel_size=2), {}, "not both"),
    (dict(ds_sequence_parallel_size=0), {}, "must be >= 1"),
    (dict(ds_sequence_parallel_size=4), {}, "num_query_groups=2 .* 2 heads per tensor-parallel rank"),
    (dict(ds_sequence_parallel_size=2, tensor_model_parallel_size=2), {}, "num_query_groups=2 .* 1 heads"),
    (dict(context_parallel_size=2), dict(position_embedding_type="alibi"), "ALiBi"),
    (dict(context_parallel_size=2), dict(attention_dropout=0.1), "--attention-dropout 0"),
])
def test_bad_splits_are_user_errors(parallel, model, match):
    with pytest.raises(UserError, match=match):
        check_parallel_shapes(ModelConfig(**{**LLAMA, **model}), ParallelConfig(**parallel))


def test_ring_has_no_head_limit_and_ulysses_fits_when_heads_divide():
    check_parallel_shapes(ModelConfig(**LLAMA), ParallelConfig(context_parallel_size=8))
    check_parallel_shapes(ModelConfig(**LLAMA), ParallelConfig(ds_sequence_parallel_size=2))


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("ring", [False, True])
def test_activations_per_rank_fall_to_one_over_n(ring, flash):
    model = ModelConfig(**{**LLAMA, "num_layers": 8, "hidden_size": 1024, "num_attention_heads": 16,
                           "num_query_groups": 16, "max_position_embeddings": 32768})
    base = MemorySetup(seq_length=32768, precision="bf16", flash_attention=flash)
    whole = layer_activation_bytes(model, base)
    ring_bytes = []
    for n in (2, 4, 8):
        split = MemorySetup(seq_length=32768, precision="bf16", flash_attention=flash, seq_split=n, ring=ring)
        ratio = layer_activation_bytes(model, split) / whole
        if not ring:  # Ulysses: exactly 1/n
            assert ratio == pytest.approx(1 / n), (n, ratio)
            continue
        # Ring: megaclm's explicit-score blocks (2n+1 per rank of c = s/2n tokens, fp32 scores, probabilities,
        # output and merge copy: 8 a c (c + d) bytes each; measured by bench/efficiency.py), not flash, plus
        # the gathered keys/values of the other ranks, on top of everything but the core attention.
        c, a, d, e = 32768 // (2 * n), 16, 64, 2
        rest = layer_activation_bytes(replace(model, recompute_granularity="selective"), replace(split, ring=False))
        gathered = 2 * (32768 - 32768 // n) * 16 * d * e
        assert layer_activation_bytes(model, split) == rest + (2 * n + 1) * 8 * a * c * (c + d) + gathered
        ring_bytes.append(layer_activation_bytes(model, split))
    assert ring_bytes == sorted(ring_bytes, reverse=True)  # fewer bytes per rank as n grows
    zero3 = [estimate_memory(model, 32000, MemorySetup(seq_length=32768, zero_stage=3, seq_split=n)) for n in (1, 4)]
    assert zero3[1].gpu["Adam moments"] == pytest.approx(zero3[0].gpu["Adam moments"] / 4)  # ZeRO shards over seq x dp
