"""What bench/efficiency.py counts during one optimizer step: saved activation bytes, collectives, host
syncs, and the FLOPs torch.utils.flop_counter misses on the CPU. Each counter patches what it counts only
inside its `installed()` context."""
import contextlib
import os
import sys
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SavedActivations:
    """Bytes autograd keeps during the model's forward (not a recompute in backward), per forward call, split
    into the transformer layers' share and the rest (embedding, final norm and loss)."""

    def __init__(self, module: torch.nn.Module, embedding: torch.nn.Module | None, head: torch.nn.Module | None):
        self.weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.seen: set[int] = set()
        self.calls: list[Counter] = []
        self.phase = None  # None outside the forward
        self.handles = [module.register_forward_pre_hook(lambda *a: self._set("layers", new_call=True)),
                        module.register_forward_hook(lambda *a: self._set(None))]
        if embedding is not None:
            self.handles += [embedding.register_forward_pre_hook(lambda *a: self._set("other")),
                             embedding.register_forward_hook(lambda *a: self._set("layers"))]
        if head is not None:
            self.handles.append(head.register_forward_pre_hook(lambda *a: self._set("other")))

    def _set(self, phase, new_call=False):
        if new_call:
            self.calls.append(Counter())
        self.phase = phase

    def pack(self, t: torch.Tensor):
        if self.phase is not None and not isinstance(t, torch.nn.Parameter):  # ZeRO-3 gathers weights anew
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self.weights and key not in self.seen and s.nbytes() > 0:
                self.seen.add(key)
                self.calls[-1][self.phase] += s.nbytes()
        return t

    def close(self):
        for h in self.handles:
            h.remove()

    @contextlib.contextmanager
    def installed(self):
        """Saved-tensor hooks, plus DeepSpeed's activation checkpoint, which keeps its inputs on its ctx
        without save_for_backward (deepspeed.checkpointing.CheckpointFunction)."""
        import deepspeed

        checkpoint = deepspeed.checkpointing.checkpoint

        def kept(function, *args):
            for a in args:
                if torch.is_tensor(a):
                    self.pack(a)
            return checkpoint(function, *args)

        deepspeed.checkpointing.checkpoint = kept
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield self
        finally:
            deepspeed.checkpointing.checkpoint = checkpoint


# torch.distributed / deepspeed.comm function -> kind; the bytes counted are those of its largest tensor (list)
# argument: all-reduce the tensor, all-gather the gathered output, reduce-scatter the input, send/recv the tensor
COLLECTIVES = {"all_reduce": "all-reduce", "all_gather": "all-gather", "all_gather_into_tensor": "all-gather",
               "_all_gather_base": "all-gather", "reduce_scatter": "reduce-scatter",
               "reduce_scatter_tensor": "reduce-scatter", "_reduce_scatter_base": "reduce-scatter",
               "broadcast": "broadcast", "send": "send", "recv": "recv", "isend": "send", "irecv": "recv",
               "all_to_all_single": "all-to-all", "all_to_all": "all-to-all", "reduce": "reduce",
               "barrier": "barrier", "all_gather_object": "all-gather-object"}
# deepspeed.comm's own names (its torch backend keeps references to torch.distributed's functions, so
# patching those alone misses e.g. ZeRO's all_gather_into_tensor)
DS_COLLECTIVES = {**COLLECTIVES, "allgather_fn": "all-gather", "reduce_scatter_fn": "reduce-scatter",
                  "all_reduce_coalesced": "all-reduce", "all_gather_coalesced": "all-gather",
                  "inference_all_reduce": "all-reduce"}


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CollectiveCounter:
    """Counts torch.distributed collectives by (kind, group name): calls and bytes. Calls made inside a
    counted one (megaclm's gloo reduce-scatter, which is an all-reduce) are not counted again, nor calls on
    a group of one rank (no traffic)."""

    def __init__(self, group_names: dict):
        self.group_names = group_names
        self.calls, self.bytes = Counter(), Counter()
        self.depth = 0
        self.active = False

    def _group(self, group) -> str:
        import torch.distributed as dist

        if group is None or group is dist.group.WORLD:
            return "world"
        for name, g in self.group_names.items():
            if g is group:
                return name
        return "ranks" + ",".join(map(str, dist.get_process_group_ranks(group)))

    def wrap(self, fn, kind: str):
        import torch.distributed as dist

        def counted(*a, **kw):
            if self.active and self.depth == 0:
                group = kw.get("group", next((x for x in a if isinstance(x, dist.ProcessGroup)), None))
                if dist.get_world_size(group) > 1:
                    key = (kind, self._group(group))
                    self.calls[key] += 1
                    self.bytes[key] += max([_nbytes(x) for x in (*a, *kw.values())], default=0)
            self.depth += 1
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1

        return counted

    @contextlib.contextmanager
    def installed(self):
        import deepspeed.comm as ds_comm
        import torch.distributed as dist

        from megaclm.parallel import mappings

        saved = [(module, name, getattr(module, name)) for module, table in ((dist, COLLECTIVES),
                                                                             (ds_comm, DS_COLLECTIVES))
                 for name in table if hasattr(module, name)]
        for module, name, fn in saved:
            setattr(module, name, self.wrap(fn, DS_COLLECTIVES[name]))
        # gloo has no reduce-scatter: megaclm runs it as an all-reduce (named _reduce_scatter before issue 24)
        name = "reduce_scatter" if hasattr(mappings, "reduce_scatter") else "_reduce_scatter"
        reduce_scatter = getattr(mappings, name)
        setattr(mappings, name, self.wrap(reduce_scatter, "reduce-scatter"))
        try:
            yield self
        finally:
            for module, attr, fn in saved:
                setattr(module, attr, fn)
            setattr(mappings, name, reduce_scatter)


SYNC_METHODS = ("item", "tolist", "cpu", "nonzero", "__bool__", "__float__", "__int__")


class HostSyncCounter:
    """Counts the Tensor methods that wait for the device (on a GPU), by the source line calling them.

    Python-level calls only: a sync inside an ATen op (repeat_interleave with tensor repeats, boolean-mask
    indexing) is not seen."""

    def __init__(self):
        self.lines = Counter()
        self.active = False

    def _where(self) -> str | None:
        frame = sys._getframe(2)
        path = os.path.abspath(frame.f_code.co_filename)
        if os.sep.join(("torch", "optim", "")) in path:
            return None  # torch AdamW's CPU step counters: on a GPU DeepSpeed runs FusedAdam, without them
        for prefix in (ROOT + os.sep, os.path.dirname(os.path.dirname(torch.__file__)) + os.sep):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return f"{path}:{frame.f_lineno}"

    def wrap(self, fn):
        def counted(*a, **kw):
            where = self._where() if self.active else None
            if where is not None:
                self.lines[where] += 1
            return fn(*a, **kw)

        return counted

    @contextlib.contextmanager
    def installed(self):
        saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
        nonzero = torch.nonzero
        for name, fn in saved.items():
            setattr(torch.Tensor, name, self.wrap(fn))
        torch.nonzero = self.wrap(nonzero)
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)
            torch.nonzero = nonzero


def _cpu_sdpa_flops():
    """torch.utils.flop_counter counts the CUDA attention kernels only; the CPU flash kernel does the same work."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    # in-place addmm_ (the fused linear cross-entropy's weight gradient) is not in its table either
    return {aten.addmm_: lambda a, b, c, *x, out_shape=None, **kw: fc.addmm_flop(a, b, c),
            aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw:
            fc.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, out_shape=None, **kw:
            fc.sdpa_backward_flop_count(g, q, k, v)}


CPU_SDPA_FLOPS = _cpu_sdpa_flops()
