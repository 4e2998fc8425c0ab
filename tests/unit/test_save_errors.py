"""megaclm.checkpoint.save_errors on one process: what a failed write reports and leaves behind (the launcher test
with a full tmpfs is tests/integration/test_signals.py)."""
import errno
import os

import pytest
import torch

from megaclm.checkpoint.save_errors import (RECOVERY_SCRIPTS, AtomicCheckpointEngine, CheckpointSaveError,
                                            agree_saved, describe)


class Inner:
    def commit(self, info):
        return True


def test_a_failed_recovery_script_copy_is_recorded_and_its_partial_copy_removed(tmp_path):
    def copy(save_dir):  # shutil.copyfile running out of space half-way through the first script
        (tmp_path / RECOVERY_SCRIPTS[0]).write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device", "/site-packages/zero_to_fp32.py", None,
                      str(tmp_path / RECOVERY_SCRIPTS[0]))

    atomic = AtomicCheckpointEngine(Inner())
    atomic.guarded_copy(copy)(str(tmp_path))
    assert atomic.error == f"no space left on device (ENOSPC) writing {tmp_path / RECOVERY_SCRIPTS[0]}"
    assert os.listdir(tmp_path) == []
    atomic.save({"x": torch.zeros(2)}, str(tmp_path / "after.pt"))  # skipped after the first failure
    assert os.listdir(tmp_path) == []


def test_writes_are_atomic_and_a_failure_names_the_final_path(tmp_path):
    atomic = AtomicCheckpointEngine(Inner())
    atomic.save({"x": torch.ones(3)}, str(tmp_path / "tag" / "a.pt"))
    assert torch.equal(torch.load(tmp_path / "tag" / "a.pt")["x"], torch.ones(3)) and atomic.error is None
    (tmp_path / "blocker").write_text("")  # a file where a directory should be
    atomic.save({"x": torch.ones(3)}, str(tmp_path / "blocker" / "b.pt"))
    assert atomic.error.endswith(f"writing {tmp_path / 'blocker'}")
    assert describe(ValueError("bad")) == "ValueError: bad"


def test_agreement_on_one_process_removes_the_partial_tag_and_keeps_latest(tmp_path):
    (tmp_path / "iter_0000002" / "megaclm").mkdir(parents=True)
    (tmp_path / "latest").write_text("iter_0000002")
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "iter_0000004" / "part.pt").write_text("")
    agree_saved(None, str(tmp_path), "iter_0000004")  # no failure: nothing happens
    assert (tmp_path / "iter_0000004" / "part.pt").exists()
    with pytest.raises(CheckpointSaveError, match=r"^checkpoint iter_0000004 was not saved: rank 0: disk gone; its "
                                                  r"partial files were removed and `latest` still names iter_0000002"):
        agree_saved("disk gone", str(tmp_path), "iter_0000004")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "latest"]
