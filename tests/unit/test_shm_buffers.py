"""megaclm.utils.shm_buffers: a process removes the DeepSpeed buffer files it maps, and no other file."""
import mmap
import os

import pytest

from megaclm.utils import shm_buffers

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")


def test_removes_only_the_buffers_this_process_maps():
    name = f"{shm_buffers.PREFIX}0_127.0.0.1_unit{os.getpid()}_"
    mine, other = name + "0", name + "1"  # `other`: a name alike, made by "another run", never mapped here
    try:
        for path in (mine, other):
            with open(path, "wb") as f:
                f.write(b"\0" * mmap.PAGESIZE)
        with open(mine, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), mmap.PAGESIZE)
        assert mine in shm_buffers.mapped() and other not in shm_buffers.mapped()
        assert shm_buffers.remove_mapped() == [mine]
        assert not os.path.exists(mine) and os.path.exists(other)
        assert shm_buffers.mapped() == []  # still mapped, but "(deleted)": nothing left to remove
        assert shm_buffers.remove_mapped() == []
        mapping.close()
    finally:
        for path in (mine, other):
            if os.path.exists(path):
                os.remove(path)
