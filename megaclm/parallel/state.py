"""Who is who in a (pipeline x data x tensor)-parallel job: pure rank math plus the process groups.

The layout is DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model; tensor rank fastest),
the same object DeepSpeed's PipelineModule builds its grid from, so megaclm's tensor-parallel groups and
DeepSpeed's pipeline stages agree on every rank:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

e.g. world 8, tp 2, pp 2 (dp 2): tp groups [0,1] [2,3] [4,5] [6,7]; dp groups [0,2] [1,3] [4,6] [5,7];
pipelines [0,4] [1,5] [2,6] [3,7]; model-parallel (one replica: tp x pp) groups [0,1,4,5] [2,3,6,7].

Expert parallelism (EP, Mixture of Experts) splits each data-parallel group into consecutive blocks of
`ep` ranks that exchange tokens by all-to-all: ep_rank = dp_rank % ep. e.g. world 8, tp 2, ep 2 (dp 4):
dp groups [0,2,4,6] [1,3,5,7]; ep groups [0,2] [4,6] [1,3] [5,7].

A `ParallelState` computes all of that without processes; `init_process_groups()` then creates the
torch.distributed groups (every rank must call it, in the same order). The `get_*` methods are
DeepSpeed's `mpu` protocol (deepspeed.initialize(mpu=...)); "model parallel" there means one replica's
ranks (tp x pp), as in DeepSpeed's own PipelineParallelGrid.
"""
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megaclm.config.parallel import ParallelConfig
from megaclm.utils.errors import UserError


class ParallelState:
    def __init__(self, world_size: int, rank: int, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 sequence_parallel: bool = False, expert_parallel_size: int = 1):
        tp, pp, ep = tensor_parallel_size, pipeline_parallel_size, expert_parallel_size
        if tp < 1 or pp < 1:
            raise UserError(f"parallel.tensor_model_parallel_size={tp} and parallel.pipeline_model_parallel_size={pp} "
                            "must be >= 1")
        if world_size % (tp * pp):
            raise UserError(f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size={tp} "
                            f"x parallel.pipeline_model_parallel_size={pp}; launch a multiple of {tp * pp} ranks")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside the world of {world_size} ranks")
        self.world_size, self.rank = world_size, rank
        self.tp_size, self.pp_size, self.dp_size = tp, pp, world_size // (tp * pp)
        # Megatron's SP splits activations across the tensor-parallel ranks; with one rank there is nothing to split.
        self.sequence_parallel = sequence_parallel and tp > 1
        self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.dp_size)
        coord = self.topology.get_coord(rank)
        self.tp_rank, self.dp_rank, self.pp_rank = coord.model, coord.data, coord.pipe
        self.tp_group_ranks = self._my_list("model")
        self.dp_group_ranks = self._my_list("data")
        self.pp_group_ranks = self._my_list("pipe")
        self.model_parallel_group_ranks = sorted(self.topology.filter_match(data=self.dp_rank))
        if ep < 1 or self.dp_size % ep:
            raise UserError(f"parallel.expert_model_parallel_size={ep} must be >= 1 and divide the data-parallel "
                            f"size {self.dp_size}")
        self.ep_size, self.ep_rank = ep, self.dp_rank % ep
        self.ep_group_ranks = self._ep_lists(self.dp_group_ranks)[self.dp_rank // ep]
        self._groups: dict[str, object] | None = None

    def __deepcopy__(self, memo):
        return self  # shared run-wide state (holds process groups), not part of a model's value

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int, rank: int) -> "ParallelState":
        return cls(world_size, rank, parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                   parallel.sequence_parallel, parallel.expert_model_parallel_size)

    @classmethod
    def from_env(cls, parallel: ParallelConfig) -> "ParallelState":
        """From the initialised default process group; creates the groups too."""
        state = cls.from_config(parallel, dist.get_world_size(), dist.get_rank())
        state.init_process_groups()
        return state

    def _ep_lists(self, dp_ranks: list[int]) -> list[list[int]]:
        return [dp_ranks[i:i + self.ep_size] for i in range(0, len(dp_ranks), self.ep_size)]

    def _my_list(self, axis: str) -> list[int]:
        return next(ranks for ranks in self.topology.get_axis_comm_lists(axis) if self.rank in ranks)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def __repr__(self):
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size}, ep={self.ep_rank}/{self.ep_size}, "
                f"sp={self.sequence_parallel})")

    # ---- process groups -------------------------------------------------------------------------------------
    def init_process_groups(self) -> None:
        """Create every tp/dp/pp/ep/model-parallel group. Collective over the world: all ranks call it in order."""
        if self._groups is not None:
            return
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before ParallelState.init_process_groups()")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(f"{self} does not match the process group (rank {dist.get_rank()} of "
                               f"{dist.get_world_size()})")
        groups = {}
        lists = {"tp": self.topology.get_axis_comm_lists("model"), "dp": self.topology.get_axis_comm_lists("data"),
                 "pp": self.topology.get_axis_comm_lists("pipe"),
                 "mp": [sorted(self.topology.filter_match(data=d)) for d in range(self.dp_size)]}
        lists["ep"] = [ranks for dp in lists["dp"] for ranks in self._ep_lists(dp)]
        for name, all_ranks in lists.items():
            for ranks in all_ranks:
                group = dist.new_group(ranks=ranks)
                if self.rank in ranks:
                    groups[name] = group
        self._groups = groups

    def _group(self, name: str):
        if self._groups is None:
            raise RuntimeError("call ParallelState.init_process_groups() before using its process groups")
        return self._groups[name]

    @property
    def tp_group(self):
        return self._group("tp")

    @property
    def dp_group(self):
        return self._group("dp")

    @property
    def pp_group(self):
        return self._group("pp")

    @property
    def ep_group(self):
        return self._group("ep")

    # ---- DeepSpeed mpu protocol -------------------------------------------------------------------------------
    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_group_ranks[0]

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_group_ranks)

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return self.model_parallel_group_ranks.index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size * self.pp_size

    def get_model_parallel_group(self):
        return self._group("mp")
