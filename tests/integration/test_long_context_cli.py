"""Long context under the real launcher: `deepspeed --num_gpus 2 pretrain_gpt.py --seq-length 2048` of a tiny
Llama (GQA) with DeepSpeed-Ulysses and with ring attention, each resumed from a checkpoint saved by an
unsplit (data-parallel 2) run: the weights and the data stream do not depend on the split, so the resumed
steps' losses equal the unsplit run's own next steps (same samples; only the reduction order differs)."""
import pytest

from test_pretrain import corpus, remove_shm_buffers, run, train_losses  # noqa: F401 (fixtures)


LONG = ["--seq-length", "2048", "--max-position-embeddings", "2048", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--num-query-groups", "2", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--zero-stage", "1", "--train-iters", "6", "--save-interval", "3", "--eval-interval", "100",
        "--eval-iters", "1", "--lr-warmup-iters", "1"]


@pytest.fixture(scope="module")
def unsplit(corpus, tmp_path_factory):  # noqa: F811
    save = tmp_path_factory.mktemp("dp2") / "ckpt"
    launch = run(corpus, save, LONG)
    return save, launch


@pytest.fixture(scope="module", params=["ulysses", "ring"])
def resumed(request, corpus, unsplit, tmp_path_factory):  # noqa: F811
    flag = "--ds-sequence-parallel-size" if request.param == "ulysses" else "--context-parallel-size"
    save = tmp_path_factory.mktemp(request.param) / "ckpt"
    launch = run(corpus, save, LONG + [flag, "2", "--load", str(unsplit[0]), "--ckpt-step", "3"])
    return request.param, save, launch


def test_the_split_run_says_what_is_on_and_resumes_the_unsplit_losses(unsplit, resumed):
    kind, save, launch = resumed
    log = launch.text()
    layout = ("world 2 = tp 1 x ulysses 2 x dp 1 x pp 1" if kind == "ulysses" else
              "world 2 = tp 1 x cp 2 x dp 1 x pp 1")
    assert layout in log and "each rank holds 1024 of 2048 tokens per sample" in log, log[-3000:]
    assert "world 2 = tp 1 x dp 2 x pp 1" in unsplit[1].text()
    assert log.count("iter       5 |") == 1, "one rank (seq rank 0) logs"
    want, got = train_losses(unsplit[0]), train_losses(save)
    assert sorted(got) == [4, 5, 6], got  # resumed after iteration 3
    for it in (4, 5, 6):
        assert got[it] == pytest.approx(want[it], abs=2e-4), (it, got, want)
    assert want[6] < want[1], want  # it trains
