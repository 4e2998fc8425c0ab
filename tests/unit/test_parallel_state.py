"""ParallelState rank math for many (world, tp, pp) without processes, against an independent formula
(Megatron's order: tensor rank fastest, then data, then pipeline) and DeepSpeed's own topology."""
import itertools

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megaclm.config.parallel import ParallelConfig
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError

LAYOUTS = [(w, tp, pp) for w in (1, 2, 4, 6, 8, 12, 16) for tp in (1, 2, 4) for pp in (1, 2, 3, 4) if w % (tp * pp) == 0]


def expected_rank(tp_rank, dp_rank, pp_rank, tp, dp):
    return pp_rank * dp * tp + dp_rank * tp + tp_rank


@pytest.mark.parametrize("world,tp,pp", LAYOUTS)
def test_coordinates_and_groups_follow_megatron_order(world, tp, pp):
    dp = world // (tp * pp)
    states = [ParallelState(world, r, tp, pp) for r in range(world)]
    for tp_r, dp_r, pp_r in itertools.product(range(tp), range(dp), range(pp)):
        s = states[expected_rank(tp_r, dp_r, pp_r, tp, dp)]
        assert (s.tp_rank, s.dp_rank, s.pp_rank) == (tp_r, dp_r, pp_r)
        assert (s.tp_size, s.dp_size, s.pp_size) == (tp, dp, pp)
        assert s.tp_group_ranks == [expected_rank(t, dp_r, pp_r, tp, dp) for t in range(tp)]
        assert s.dp_group_ranks == [expected_rank(tp_r, d, pp_r, tp, dp) for d in range(dp)]
        assert s.pp_group_ranks == [expected_rank(tp_r, dp_r, p, tp, dp) for p in range(pp)]
        assert s.model_parallel_group_ranks == sorted(expected_rank(t, dp_r, p, tp, dp)
                                                      for t in range(tp) for p in range(pp))
        assert s.is_first_stage == (pp_r == 0) and s.is_last_stage == (pp_r == pp - 1)


@pytest.mark.parametrize("world,tp,pp", LAYOUTS)
def test_groups_partition_the_world(world, tp, pp):
    states = [ParallelState(world, r, tp, pp) for r in range(world)]
    for attr, size in (("tp_group_ranks", tp), ("dp_group_ranks", world // (tp * pp)), ("pp_group_ranks", pp),
                       ("model_parallel_group_ranks", tp * pp)):
        groups = {tuple(getattr(s, attr)) for s in states}
        assert all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))  # disjoint and covering
        assert all(s.rank in getattr(s, attr) for s in states)


@pytest.mark.parametrize("world,tp,pp", [(8, 2, 2), (12, 2, 3), (4, 1, 4)])
def test_agrees_with_deepspeed_pipeline_topology(world, tp, pp):
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    for r in range(world):
        s = ParallelState(world, r, tp, pp)
        c = topo.get_coord(r)
        assert (s.pp_rank, s.dp_rank, s.tp_rank) == (c.pipe, c.data, c.model)


def test_mpu_protocol_reports_the_rank_math():
    s = ParallelState(8, 5, tensor_parallel_size=2, pipeline_parallel_size=2)  # tp 1, dp 0, pp 1
    assert s.get_tensor_model_parallel_rank() == s.get_slice_parallel_rank() == 1
    assert s.get_tensor_model_parallel_world_size() == s.get_slice_parallel_world_size() == 2
    assert s.get_tensor_model_parallel_src_rank() == 4
    assert s.get_data_parallel_rank() == 0 and s.get_data_parallel_world_size() == 2
    assert s.get_data_parallel_group_ranks() == [5, 7]
    assert s.get_pipeline_model_parallel_rank() == s.get_pipe_parallel_rank() == 1
    assert s.get_pipeline_model_parallel_world_size() == s.get_pipe_parallel_world_size() == 2
    # "model parallel" = one replica (tp x pp), as DeepSpeed's own grid defines it: ranks [0, 1, 4, 5].
    assert s.get_model_parallel_world_size() == 4 and s.get_model_parallel_rank() == 3
    with pytest.raises(RuntimeError, match="init_process_groups"):
        s.get_data_parallel_group()


def test_from_config_and_sequence_parallel_needs_tp():
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True)
    s = ParallelState.from_config(cfg, world_size=8, rank=3)
    assert (s.tp_size, s.pp_size, s.dp_size, s.sequence_parallel) == (2, 2, 2, True)
    assert not ParallelState(2, 0, 1, 1, sequence_parallel=True).sequence_parallel


@pytest.mark.parametrize("world,tp,pp,rank,match", [
    (6, 4, 1, 0, "world size 6 is not divisible by parallel.tensor_model_parallel_size=4"),
    (8, 2, 3, 0, "launch a multiple of 6"),
    (4, 0, 1, 0, "must be >= 1"),
    (4, 2, 2, 4, "rank 4 is outside"),
])
def test_bad_layouts_are_user_errors(world, tp, pp, rank, match):
    with pytest.raises(UserError, match=match):
        ParallelState(world, rank, tp, pp)


def test_parallel_config_validates_fields():
    with pytest.raises(UserError, match="parallel.tensor_model_parallel_size=0"):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(UserError, match="parallel.pipeline_partition_method='random'"):
        ParallelConfig(pipeline_partition_method="random")
