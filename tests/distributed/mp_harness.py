"""Run one function on N spawned gloo ranks and collect what each returns (or its traceback).

    results = run_ranks(4, my_module.worker, arg)   # worker(rank, world_size, arg) -> picklable
    results[rank]                                    # what rank returned

The worker must live in an importable module (spawn re-imports it). Each rank gets RANK/LOCAL_RANK/
WORLD_SIZE/MASTER_ADDR/MASTER_PORT (a free port), one torch thread and an initialised gloo group.
A failing rank's traceback is raised in the parent, with every rank's stderr kept by pytest.
"""
import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_dir, fn, args):
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report, do not hang the other ranks' parent
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if dist.is_initialized() and result[0] == "ok":
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 600.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{world_size} ranks running {fn.__name__} did not finish in {timeout:.0f} s")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
