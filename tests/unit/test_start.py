"""megaclm.training.start: which runs may write into a --save that holds checkpoints (the launcher runs:
tests/integration/test_pretrained_checkpoint.py)."""
import json
from types import SimpleNamespace

import pytest

from megaclm.checkpoint.layout import tag_for
from megaclm.checkpoint.manifest import Choice
from megaclm.training.start import Start, check_save
from megaclm.utils.errors import UserError


def checkpoint(root, iteration: int) -> str:
    """A directory with one complete checkpoint (its meta.json) at `iteration`."""
    meta = root / tag_for(iteration) / "megaclm" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"iteration": iteration, "client": True}))
    (root / "latest").write_text(tag_for(iteration))
    return str(root)


def cfg(save, finetune=False, overwrite=False):
    return SimpleNamespace(checkpoint=SimpleNamespace(save=save, finetune=finetune, overwrite_save=overwrite))


def test_a_run_may_not_overwrite_checkpoints_it_did_not_resume_from(tmp_path):
    save = checkpoint(tmp_path / "save", 8)
    older, newer = checkpoint(tmp_path / "older", 4), checkpoint(tmp_path / "newer", 12)
    fresh = Start(None, Choice(None), False)
    for start in (fresh, Start(older, Choice(tag_for(4)), False), Start(save, Choice(tag_for(8)), True)):
        with pytest.raises(UserError, match=rf"^--save {save} already holds checkpoints of another run \(newest "
                                            rf"iter_0000008\) and this run starts at iteration (0|4)"):
            check_save(cfg(save), start)
        check_save(cfg(save, overwrite=True), start)
    with pytest.raises(UserError, match=f"resume that run with --load {save} --no-finetune, pass another --save"):
        check_save(cfg(save, finetune=True), Start(save, Choice(tag_for(8)), True))
    check_save(cfg(save), Start(save, Choice(tag_for(8)), False))  # resuming the run that saved there
    check_save(cfg(save), Start(save, Choice(tag_for(4)), False))  # ... from an older checkpoint of it
    check_save(cfg(save), Start(newer, Choice(tag_for(12)), False))  # continuing past what is there
    check_save(cfg(str(tmp_path / "empty")), fresh)
    check_save(cfg(None), fresh)
