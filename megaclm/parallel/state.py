"""Who is who in a (pipeline x data x sequence x tensor)-parallel job: pure rank math plus the process groups.

The layout is a DeepSpeed `ProcessTopology` with axes (pipe, data, seq, model), tensor rank fastest; without
a sequence split it is exactly `PipeModelDataParallelTopology` (axes pipe, data, model), the object DeepSpeed's
PipelineModule builds its grid from, so megaclm's tensor-parallel groups and DeepSpeed's stages agree:

    rank = pp_rank * (dp * seq * tp) + dp_rank * (seq * tp) + cp_rank * tp + tp_rank

The sequence axis ("seq": DeepSpeed-Ulysses or ring context parallelism, `cp_size` ranks sharing one sample,
each holding a slice of its tokens) sits between tp and dp, where Megatron-LM puts context parallelism:
its collectives run in every layer (Ulysses' all-to-alls, the ring's key/value exchange), so after TP's
they want the nearest ranks (one node); dp's gradient reduction runs once per step and can cross nodes.
Its members are `cp_*` (context parallel, Ulysses and ring alike; `ulysses_size` / `ring_size` say which split
runs); `sequence_parallel` is only Megatron's SP, the activations split over the tensor-parallel ranks.

e.g. world 8, tp 2, pp 2 (dp 2): tp groups [0,1] [2,3] [4,5] [6,7]; dp groups [0,2] [1,3] [4,6] [5,7];
pipelines [0,4] [1,5] [2,6] [3,7]; model-parallel (one replica: tp x pp) groups [0,1,4,5] [2,3,6,7].
World 8, tp 2, seq 2 (dp 2): tp [0,1] [2,3] [4,5] [6,7]; seq [0,2] [1,3] [4,6] [5,7]; dp [0,4] [1,5] [2,6]
[3,7]; seq x dp (DeepSpeed's "sequence data parallel" group, over which ZeRO shards and gradients are
summed over seq and averaged over dp) [0,2,4,6] [1,3,5,7].

Expert parallelism (EP, Mixture of Experts) splits each seq x dp group (= dp group without a sequence
split) into consecutive blocks of `ep` ranks that exchange tokens by all-to-all and hold different experts:
ep_rank = i % ep, i the rank's index in its seq x dp group (dp_rank * seq + cp_rank). The ranks of a seq x dp
group with the same ep_rank hold the same experts: their "expert data parallel" group (edp, seq*dp/ep ranks)
is where expert gradients are reduced (summed over seq, averaged over dp, as every other gradient) and ZeRO
partitions expert states. Sequence ranks hold different tokens of the same samples, so to the experts they
are data-parallel ranks like any other: with ep = seq the token exchange runs within each sample. e.g.
world 8, tp 2, ep 2 (dp 4): dp groups [0,2,4,6] [1,3,5,7]; ep groups [0,2] [4,6] [1,3] [5,7]; edp groups
[0,4] [2,6] [1,5] [3,7]. World 4, Ulysses 2, ep 2 (dp 2): seq groups [0,1] [2,3] are the ep groups, edp
groups [0,2] [1,3]. Pipeline stages split nothing further (dp groups never cross stages): world 4, pp 2,
ep 2 (dp 2) has ep groups [0,1] [2,3], each rank its own edp group. This is DeepSpeed's own layout
(deepspeed.utils.groups `_get_expert_parallel_ranks`, "E + M + D", whose data axis is world / (tp x pp),
sequence ranks included), and the expert groups are DeepSpeed's: `init_process_groups` registers them where its engine and ZeRO look them up, under "ep_size_{ep}".

A `ParallelState` computes all of that without processes; `init_process_groups()` then creates the
torch.distributed groups (every rank must call it, in the same order). The `get_*` methods are
DeepSpeed's `mpu` protocol (deepspeed.initialize(mpu=...)); "model parallel" there means one replica's
ranks (tp x pp), as in DeepSpeed's own PipelineParallelGrid; `get_sequence_parallel_*` and
`get_sequence_data_parallel_*` tell DeepSpeed's engine and ZeRO to reduce gradients over seq x dp.
"""
import deepspeed.comm
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, ProcessTopology
from deepspeed.utils import groups as ds_groups

from megaclm.config.parallel import ParallelConfig
from megaclm.utils.errors import UserError


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's key for the expert groups of an EP size, and the `group_name` of expert parameters."""
    return f"ep_size_{ep_size}"


class ParallelState:
    def __init__(self, world_size: int, rank: int, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 sequence_parallel: bool = False, ulysses_size: int = 1, context_parallel_size: int = 1,
                 expert_parallel_size: int = 1, experts: bool = False):
        """`experts`: the model has Mixture-of-Experts layers (init_process_groups then creates the expert groups)."""
        tp, pp, ep = tensor_parallel_size, pipeline_parallel_size, expert_parallel_size
        if min(tp, pp, ulysses_size, context_parallel_size) < 1:
            raise UserError(f"parallel.tensor_model_parallel_size={tp}, parallel.pipeline_model_parallel_size={pp}, "
                            f"parallel.ds_sequence_parallel_size={ulysses_size} and parallel.context_parallel_size="
                            f"{context_parallel_size} must be >= 1")
        if ulysses_size > 1 and context_parallel_size > 1:
            raise UserError("parallel.ds_sequence_parallel_size and parallel.context_parallel_size are both > 1; "
                            "split the sequence one way")
        seq = ulysses_size * context_parallel_size
        if world_size % (tp * pp * seq):
            raise UserError(f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size={tp} "
                            f"x parallel.pipeline_model_parallel_size={pp} x the sequence split {seq}; launch a "
                            f"multiple of {tp * pp * seq} ranks")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside the world of {world_size} ranks")
        self.world_size, self.rank = world_size, rank
        self.tp_size, self.pp_size, self.dp_size = tp, pp, world_size // (tp * pp * seq)
        self.cp_size, self.ulysses_size, self.ring_size = seq, ulysses_size, context_parallel_size
        # Megatron's SP splits activations across the tensor-parallel ranks; with one rank there is nothing to split.
        self.sequence_parallel = sequence_parallel and tp > 1
        if seq == 1:
            self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.dp_size)
        else:
            self.topology = ProcessTopology(axes=["pipe", "data", "seq", "model"], dims=[pp, self.dp_size, seq, tp])
        coord = self.topology.get_coord(rank)
        self.tp_rank, self.dp_rank, self.pp_rank = coord.model, coord.data, coord.pipe
        self.cp_rank = coord.seq if seq > 1 else 0
        # DeepSpeed's pipeline engine knows pipe/data/model only: it sees the seq ranks as data-parallel
        # replicas (same rank order, data rank = dp_rank * seq + cp_rank) and averages gradients over them,
        # which the per-token loss normalisation compensates for (megaclm.training.loss: x seq, a sum over the
        # sequence's parts).
        self.pipeline_topology = (self.topology if seq == 1 else
                                  PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.dp_size * seq))
        self.tp_group_ranks = self._my_list("model")
        self.dp_group_ranks = self._my_list("data")
        self.pp_group_ranks = self._my_list("pipe")
        self.cp_group_ranks = self._my_list("seq") if seq > 1 else [rank]
        self.cp_dp_group_ranks = sorted(self.topology.filter_match(pipe=self.pp_rank, model=self.tp_rank))
        self.model_parallel_group_ranks = sorted(self.topology.filter_match(**self._replica_coords(rank)))
        if ep < 1 or (self.dp_size * seq) % ep:
            raise UserError(f"parallel.expert_model_parallel_size={ep} must be >= 1 and divide the data-parallel "
                            f"size {self.dp_size} x the sequence split {seq}")
        i = self.cp_dp_group_ranks.index(rank)  # = dp_rank * seq + cp_rank
        self.ep_size, self.ep_rank, self.edp_rank = ep, i % ep, i // ep
        self.has_experts = experts
        self.ep_group_ranks = self.cp_dp_group_ranks[self.edp_rank * ep:(self.edp_rank + 1) * ep]
        self.edp_group_ranks = self.cp_dp_group_ranks[self.ep_rank::ep]
        self._groups: dict[str, object] | None = None

    @classmethod
    def single(cls) -> "ParallelState":
        """One rank, nothing split: what a model built outside a distributed job (tests, conversion tools) runs
        with. Its collectives all short-circuit (a size-1 group is never looked up), so it needs no process
        groups."""
        return cls(world_size=1, rank=0)

    def __deepcopy__(self, memo):
        return self  # shared run-wide state (holds process groups), not part of a model's value

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int, rank: int,
                    experts: bool = False) -> "ParallelState":
        return cls(world_size, rank, parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                   parallel.sequence_parallel, parallel.ds_sequence_parallel_size, parallel.context_parallel_size,
                   parallel.expert_model_parallel_size, experts)

    @classmethod
    def from_env(cls, parallel: ParallelConfig, experts: bool = False) -> "ParallelState":
        """From the initialised default process group; creates the groups too."""
        state = cls.from_config(parallel, dist.get_world_size(), dist.get_rank(), experts)
        state.init_process_groups()
        return state

    def _replica_coords(self, rank: int) -> dict[str, int]:
        """The coordinates naming `rank`'s model replica (tp x pp): its data and sequence ranks."""
        coord = self.topology.get_coord(rank)
        return {"data": coord.data, **({"seq": coord.seq} if self.cp_size > 1 else {})}

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
                f"sp={self.sequence_parallel}, cp={self.cp_rank}/{self.cp_size} ({self.cp_kind}))")

    @property
    def cp_kind(self) -> str | None:
        """How the sequence is split across the seq axis: "ulysses", "ring" or None."""
        return "ulysses" if self.ulysses_size > 1 else "ring" if self.ring_size > 1 else None

    # ---- process groups -------------------------------------------------------------------------------------
    def init_process_groups(self) -> None:
        """Create every tp/dp/pp/seq/seq-dp/model-parallel group, and DeepSpeed's expert groups for a model with
        experts. Collective over the world: all ranks call it in order."""
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
                 "mp": sorted({tuple(sorted(self.topology.filter_match(**self._replica_coords(r))))
                               for r in range(self.world_size)})}
        if self.cp_size > 1:
            lists["seq"] = self.topology.get_axis_comm_lists("seq")
            lists["seq_dp"] = sorted({tuple(sorted(self.topology.filter_match(pipe=p, model=t)))
                                      for p in range(self.pp_size) for t in range(self.tp_size)})
        for name, all_ranks in lists.items():
            for ranks in all_ranks:
                group = dist.new_group(ranks=list(ranks))
                if self.rank in ranks:
                    groups[name] = group
        self._groups = groups
        if self.has_experts:
            self._init_expert_groups()

    @property
    def expert_group_name(self) -> str:
        return expert_group_name(self.ep_size)

    def _init_expert_groups(self) -> None:
        """DeepSpeed's expert-parallel and expert-data-parallel groups, in DeepSpeed's registry (module globals
        keyed by `expert_group_name`, read by its engine and ZeRO). The rank lists are DeepSpeed's
        (`_get_expert_parallel_ranks`, checked against this layout); the groups are created here rather than
        by its `_create_expert_data_and_model_parallel`, which asserts that ep divides the mpu's dp size and so
        refuses an EP group made of sequence ranks (dp 1, seq 2, ep 2), and which declares the experts split
        across TP ranks (megaclm's are whole on each: DeepSpeed's norms must not sum them over TP). The
        registry is emptied first: DeepSpeed names its MoE checkpoint files after the largest EP size
        registered, and a process building several layouts (tests) would otherwise keep stale groups; every
        rank does the same, so the collective group creation stays in step."""
        for registry in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                         ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            registry.clear()
        if not deepspeed.comm.is_initialized():  # DeepSpeed's groups go through deepspeed.comm (wraps torch's group)
            deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        ds_groups.mpu = self  # DeepSpeed's group helpers size the data-parallel axis through it (as the engine sets)
        ds_groups.expert_tensor_parallel_world_size = 1
        name = self.expert_group_name
        ep_lists, edp_lists = ds_groups._get_expert_parallel_ranks(self.world_size, self.tp_size, self.ep_size,
                                                                   self.pp_size)
        for lists, groups, ranks_of in ((ep_lists, ds_groups._EXPERT_PARALLEL_GROUP,
                                         ds_groups._EXPERT_PARALLEL_GROUP_RANKS),
                                        (edp_lists, ds_groups._EXPERT_DATA_PARALLEL_GROUP,
                                         ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS)):
            for ranks in lists:
                group = deepspeed.comm.new_group(ranks)
                if self.rank in ranks:
                    groups[name], ranks_of[name] = group, ranks
        made = (list(ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name]),
                list(ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name]))
        if made != (self.ep_group_ranks, self.edp_group_ranks):
            raise RuntimeError(f"DeepSpeed's expert groups (ep, edp) are {made} for rank {self.rank}, megaclm's layout "
                               f"says {(self.ep_group_ranks, self.edp_group_ranks)}: the two rank orders disagree")

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

    def _expert_groups_ready(self) -> str:
        if not self.has_experts:
            raise RuntimeError("expert groups exist only for a model with experts: ParallelState(..., experts=True)")
        self._group("tp")  # a clear error before init_process_groups
        return self.expert_group_name

    @property
    def ep_group(self):
        """The ranks exchanging tokens for this rank's experts (DeepSpeed's expert-parallel group)."""
        return ds_groups._get_expert_parallel_group(self._expert_groups_ready())

    @property
    def cp_group(self):
        """The sequence-split group; None without a split (the collectives then short-circuit)."""
        return self._group("seq") if self.cp_size > 1 else None

    @property
    def cp_dp_group(self):
        """seq x dp: the ranks holding the same weights; gradients are summed over seq, averaged over dp."""
        return self._group("seq_dp") if self.cp_size > 1 else self.dp_group

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

    # Ulysses and ring alike: DeepSpeed sums gradients over the sequence ranks and shards ZeRO over seq x dp.
    def get_sequence_parallel_rank(self) -> int:
        return self.cp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.cp_size

    def get_sequence_parallel_group(self):
        return self.cp_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.cp_dp_group_ranks.index(self.rank)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.cp_size * self.dp_size

    def get_sequence_data_parallel_group(self):
        return self.cp_dp_group

    def get_model_parallel_rank(self) -> int:
        return self.model_parallel_group_ranks.index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size * self.pp_size

    def get_model_parallel_group(self):
        return self._group("mp")
