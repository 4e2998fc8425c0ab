"""Never train on garbage, never lose a good checkpoint: faults injected into runs of the real
`deepspeed --num_gpus 2` launcher (helpers from test_pretrain).

  vocab      GPT-2-sized ids (up to 1499) in data for the 1000-piece tokenizer: refused at start-up at TP=1
             (was: IndexError) and TP=2 (was: trained on silently masked ids), exit status 2; ids in the
             embedding's padding rows (1000..1023) are refused too (one process, --validate-only).
  saved      one ZeRO-1 run saving iterations 2, 4 and 6 (--async-save), copied (shutil.copytree) and damaged by each test:
    flipped    64 KiB of random bytes in iter 6's optimizer file: the resume names the file, falls back to
               iter 4 (WARNING naming both tags) and trains on; with --ckpt-step 6 it is refused (exit 2)
    truncated  iter 6's model file cut in half: named, fallback to iter 4
    latest     `latest` deleted and a partial iter 7 (no meta.json) left behind: the resume takes iter 6,
               ignores iter 7 and the next save removes it
    legacy     a checkpoint without manifest whose model file is truncated: the error names the file
  nan        9 NaN steps in a row at the end of a run (under --max-consecutive-nan-steps 10) and 2 earlier:
             the periodic save waits for a healthy step, the final save is skipped, nothing healthy is
             pruned, exit status 1 with the last healthy checkpoint named.
Every checkpoint left must match its manifest (no checkpoint lost or mixed).
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megaclm.checkpoint.layout import MANIFEST, read_latest, tag_for
from megaclm.checkpoint.manifest import check_checksums, check_sizes, read_manifest
from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.utils import exitcodes
from test_pretrain import REPO, SP_MODEL, base_args, corpus, records, remove_shm_buffers, run  # noqa: F401


TAGS = [tag_for(i) for i in (2, 4, 6)]


def intact(save) -> list[str]:
    """The tags in `save`, each asserted complete and equal to its manifest."""
    tags = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    for tag in tags:
        ckpt = str(save / tag)
        check_sizes(ckpt)
        entries = read_manifest(ckpt)
        assert entries and check_checksums(ckpt, list(entries), entries) is None, tag
    return tags


def error_line(text: str) -> str:
    return next(line for line in text.splitlines() if "error: " in line)


# ---- token ids against the vocabulary ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_ids(tmp_path_factory) -> str:
    """Data with ids up to 1499, as if tokenized with a larger tokenizer than the run's 1000 pieces."""
    prefix = str(tmp_path_factory.mktemp("wide") / "gpt2_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    for _ in range(200):
        builder.add_document(rng.integers(0, 1500, 300))
    builder.finalize()
    return prefix


def one_process(prefix: str, save, extra: list[str]) -> subprocess.CompletedProcess:
    """`python pretrain_gpt.py` (world 1): a start-up refusal needs no launcher."""
    return subprocess.run([sys.executable, "pretrain_gpt.py", *base_args(prefix, save), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("tp", [1, 2])
def test_ids_past_the_vocabulary_are_refused_at_startup(wide_ids, tmp_path, tp):
    """TP=1 was an IndexError, TP=2 silently masked the ids; TP=2 runs under the launcher, TP=1 in one process."""
    if tp == 2:
        text = run(wide_ids, tmp_path / "ckpt", ["--train-iters", "4", "--tensor-model-parallel-size", "2"],
                   rc=exitcodes.BAD_INPUT).text()
    else:
        proc = one_process(wide_ids, tmp_path / "ckpt", ["--train-iters", "4"])
        assert proc.returncode == exitcodes.BAD_INPUT, proc.stderr[-3000:]
        text = proc.stderr
    assert error_line(text).endswith(
        f"error: dataset {wide_ids} (train data) holds token ids 0..1499, but this run's tokenizer (--tokenizer-type "
        f"SentencePieceTokenizer --tokenizer-model {SP_MODEL}) has 1000 ids and the model's embedding 1024 rows (the "
        f"tokenizer, padded): id 1499 is past the model's embedding. The data was most likely tokenized with another "
        f"tokenizer; preprocess it again with --tokenizer-type SentencePieceTokenizer --tokenizer-model {SP_MODEL} "
        "(tools/preprocess_data.py), or train with the tokenizer it was made with")
    assert "IndexError" not in text and "iter " not in text  # refused before any step
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("iter_*"))


def test_ids_in_the_padding_rows_are_refused(tmp_path):
    prefix = str(tmp_path / "padding_document")
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    for _ in range(50):
        builder.add_document(np.array([5, 6, 1010, 7] * 20))
    builder.finalize()
    proc = one_process(prefix, tmp_path / "ckpt", ["--train-iters", "4", "--validate-only"])
    assert proc.returncode == exitcodes.BAD_INPUT, proc.stderr[-3000:]
    assert "holds token ids 5..1010" in proc.stderr and "id 1010 is in the embedding's padding rows" in proc.stderr


# ---- damaged checkpoints -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("saved") / "ckpt"
    run(corpus, save, ["--zero-stage", "1", "--train-iters", "6", "--save-interval", "2", "--eval-interval", "1000",
                       "--async-save"])  # the resumes save synchronously: both paths write manifests
    assert intact(save) == TAGS and read_latest(str(save)) == TAGS[-1]
    return save


def copy(saved, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(saved, save)
    return save


def resume(corpus, save, iters: int, extra=(), rc=exitcodes.FINISHED):
    return run(corpus, save, ["--zero-stage", "1", "--train-iters", str(iters), "--save-interval", "2",
                              "--eval-interval", "1000", *extra], rc=rc)


def test_flipped_bytes_fall_back_to_the_previous_checkpoint(corpus, saved, tmp_path):
    save = copy(saved, tmp_path)
    optim = save / TAGS[2] / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(optim, "r+b") as f:
        f.seek(optim.stat().st_size // 3)
        f.write(os.urandom(64 << 10))
    pinned = resume(corpus, save, 8, ["--ckpt-step", "6"], rc=exitcodes.BAD_INPUT)
    line = error_line(pinned.text())
    assert f"error: --ckpt-step 6: checkpoint {save / TAGS[2]} cannot be loaded: {optim} has checksum " in line
    assert line.endswith("its content is damaged; pick another --ckpt-step, or drop it to load the newest intact "
                         "checkpoint")
    assert "iter " not in pinned.text() and read_latest(str(save)) == TAGS[2]
    launch = resume(corpus, save, 8)
    text = launch.text()
    assert f"checkpoint {save / TAGS[2]} is damaged or incomplete: {optim} has checksum " in text
    assert f"its content is damaged; falling back to {TAGS[1]}" in text
    assert f"loaded checkpoint {save / TAGS[1]}" in text
    assert [r["iteration"] for r in records(save) if "loss" in r][-4:] == [5, 6, 7, 8]  # resumed after iteration 4
    assert intact(save) == TAGS + [tag_for(8)] and read_latest(str(save)) == tag_for(8)  # iter 6 saved again


def test_truncated_file_is_named_and_passed_over(corpus, saved, tmp_path):
    save = copy(saved, tmp_path)
    model = save / TAGS[2] / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    os.truncate(model, size // 2)
    text = resume(corpus, save, 6).text()
    assert (f"checkpoint {save / TAGS[2]} is damaged or incomplete: {model} has {size // 2} bytes, the manifest says "
            f"{size} (truncated or overwritten); falling back to {TAGS[1]}") in text
    assert f"loaded checkpoint {save / TAGS[1]}" in text and "central directory" not in text
    assert intact(save) == TAGS and read_latest(str(save)) == TAGS[2]


def test_missing_latest_resumes_from_the_newest_complete_and_partial_saves_are_cleaned(corpus, saved, tmp_path):
    save = copy(saved, tmp_path)
    (save / "latest").unlink()
    partial = save / tag_for(7)
    shutil.copytree(save / TAGS[2], partial)
    (partial / "megaclm" / "meta.json").unlink()  # a save that died before completing
    text = resume(corpus, save, 8).text()
    assert f"--load {save}: ignoring {tag_for(7)} (no megaclm/meta.json: a save that did not finish)" in text
    assert f"--load {save} has no `latest` file; resuming from the newest complete checkpoint there, {TAGS[2]}" in text
    assert "starting from scratch" not in text and f"loaded checkpoint {save / TAGS[2]}" in text
    assert f"removed {tag_for(7)} from {save}: saves that did not finish" in text
    assert [r["iteration"] for r in records(save) if "loss" in r][-3:] == [6, 7, 8]
    assert intact(save) == TAGS + [tag_for(8)] and read_latest(str(save)) == tag_for(8)


def test_read_error_of_a_checkpoint_without_manifest_names_the_file(corpus, saved, tmp_path):
    save = copy(saved, tmp_path)
    for tag in TAGS:
        (save / tag / MANIFEST).unlink()  # written before manifests: nothing to check sizes against
    model = save / TAGS[2] / "mp_rank_00_model_states.pt"
    os.truncate(model, model.stat().st_size // 2)
    launch = resume(corpus, save, 8, rc=exitcodes.BAD_INPUT)
    assert "has no manifest (written before megaclm checked checkpoints); loading it unverified" in launch.text()
    assert f"error: checkpoint file {model} cannot be read (" in error_line(launch.text())


# ---- no save of a diverged model ---------------------------------------------------------------------------


def test_nan_streak_saves_nothing_and_prunes_nothing(corpus, tmp_path):
    save = tmp_path / "ckpt"
    nan = [7, 8] + list(range(12, 21))  # 2 bad steps, then 9 in a row to the end (the limit is 10)
    launch = run(corpus, save, ["--zero-stage", "1", "--train-iters", "20", "--save-interval", "4",
                                "--save-total-limit", "1", "--eval-interval", "1000",
                                "--callbacks", "faults:nan_iters=" + ",".join(map(str, nan))], rc=exitcodes.FAILED)
    text = launch.text()
    first, healthy = save / tag_for(4), save / tag_for(9)
    assert (f"iteration 8: not saving during a streak of bad steps (NaN/inf loss or loss spike; 2 so far); saving at "
            f"the next healthy step instead; the last healthy checkpoint is {first}") in text
    assert f"saved checkpoint {healthy}" in text  # deferred from 8 to the healthy step 9
    assert "iteration 12: not saving during a streak of bad steps (NaN/inf loss or loss spike; 1 so far)" in text
    assert "iteration 13: not saving" not in text and "iteration 16: not saving" not in text  # once per deferral
    assert (f"iteration 20: not saving during a streak of bad steps (NaN/inf loss or loss spike; 9 so far); the run "
            f"ends without saving its last steps; the last healthy checkpoint is {healthy}") in text
    assert (f"training ended at iteration 20 in a streak of bad steps, which were not saved; the last healthy "
            f"checkpoint is {healthy}") in text
    assert intact(save) == [tag_for(9)] and read_latest(str(save)) == tag_for(9)
