"""DeepSpeed's CPU all-reduce buffers in /dev/shm, removed by the run that made them. L0: no torch.

DeepSpeed's CPU communication op (deepspeed/ops/csrc/cpu/comm/shm.cpp, `shm_initialize`), when all ranks
are on one node (LOCAL_SIZE == WORLD_SIZE: the deepspeed launcher sets LOCAL_SIZE), has each rank create

    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>     (66 MiB)

and map every peer's; nothing unlinks them, so each launch left 66 MiB per rank behind. A rank calls
`remove_mapped()` as it ends (finished, failed or stopped by a signal: megaclm.training.pretrain.main) and
unlinks the buffers it has mapped. The mapping in /proc/self/maps is what marks a file as this run's: the name
alone could be another run's (one on the same address and port, or an older one's leftover). Unlinking a
file that peers still map is harmless: a mapping outlives its name. A rank killed outright (SIGKILL) removes
nothing; its file is removed by any peer that exits normally, since every rank maps all of them.
"""
from __future__ import annotations

import os

PREFIX = "/dev/shm/deepspeed_allreduce_buffer_"


def mapped(maps: str = "/proc/self/maps") -> list[str]:
    """The DeepSpeed all-reduce buffer files this process maps (still present under their name)."""
    paths = set()
    try:
        with open(maps) as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)  # address perms offset dev inode [path]
                if len(fields) == 6 and fields[5].startswith(PREFIX) and not fields[5].endswith(" (deleted)"):
                    paths.add(fields[5])
    except OSError:  # no /proc (not Linux): DeepSpeed's shm op is Linux-only too
        return []
    return sorted(paths)


def remove_mapped(maps: str = "/proc/self/maps") -> list[str]:
    """Unlink the buffers this process maps; returns those removed (a peer may have been first)."""
    removed = []
    for path in mapped(maps):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
