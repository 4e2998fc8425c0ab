"""PretrainingSampler + Curriculum: decomposition invariance, exact resume (with curriculum), errors."""
import numpy as np
import pytest

from data_testutils import EOD, make_random_dataset
from megaclm.config.data import DataConfig
from megaclm.data.builder import build_train_valid_test
from megaclm.data.curriculum import Curriculum
from megaclm.data.sampler import PretrainingSampler
from megaclm.utils.errors import UserError

GBS = 12


def _global_steps(total, consumed, mbs, dp, gbs=GBS, steps=None):
    """Per optimizer step, the samples every rank gets, in (micro step, rank) order."""
    iters = [iter(PretrainingSampler(total, consumed, mbs, r, dp, gbs)) for r in range(dp)]
    out = []
    for _ in range(steps if steps is not None else (total - consumed) // gbs):
        step = []
        for _ in range(gbs // (mbs * dp)):
            for it in iters:
                step.append(next(it))
        out.append(step)
    for it in iters:
        assert next(it, None) is None or steps is not None
    return out


@pytest.mark.parametrize("dp,mbs", [(1, 1), (1, 12), (2, 3), (3, 2), (4, 1), (6, 2), (12, 1)])
def test_every_split_of_the_global_batch_sees_the_same_samples(dp, mbs):
    steps = _global_steps(100, 0, mbs, dp)
    assert len(steps) == 100 // GBS  # the incomplete last global batch is dropped
    for g, step in enumerate(steps):
        flat = [i for micro in step for i in micro]
        assert all(len(micro) == mbs for micro in step)
        assert sorted(flat) == list(range(g * GBS, (g + 1) * GBS))  # same set for every (dp, mbs)
        assert len(set(flat)) == GBS


def test_megatron_rank_order():
    assert list(PretrainingSampler(24, 0, 2, 1, 3, 12)) == [[2, 3], [8, 9], [14, 15], [20, 21]]
    assert len(PretrainingSampler(24, 0, 2, 1, 3, 12)) == 4
    assert len(PretrainingSampler(24, 12, 2, 1, 3, 12)) == 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    web, code = make_random_dataset(d, "web", 300, seed=1), make_random_dataset(d, "code", 200, seed=2)
    cfg = DataConfig(seq_length=32, data_path=["0.7", web, "0.3", code], split="1", data_cache_path=str(d / "c"),
                     curriculum_seqlen_start=8, curriculum_seqlen_tokens=2000, data_mixing_schedule=["0:0.7,0.3",
                     "4000:0.2,0.8"], reset_position_ids=True, eod_mask_loss=True)
    train = build_train_valid_test(cfg, seed=9, train_samples=30 * GBS, eod_id=EOD, global_batch_size=GBS)[0]
    return cfg, train


def _collate(samples):
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def _run(cfg, train, dp, mbs, steps, state=None):
    """Train-loop stand-in: per step, every rank's truncated micro batches; returns (batches, states)."""
    samplers = [PretrainingSampler(len(train), 0, mbs, r, dp, GBS) for r in range(dp)]
    cur = Curriculum.from_config(cfg, GBS)
    if state is not None:
        for s in samplers:
            s.load_state_dict(state["sampler"])
        cur.load_state_dict(state["curriculum"])
    iters = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(GBS // (mbs * dp)):
            for it in iters:
                step.append(cur.truncate(_collate([train[i] for i in next(it)])))
        out.append((cur.seqlen, cur.phase, _concat(step)))
        for s in samplers:
            s.advance()
        cur.step()
    return out, {"sampler": samplers[0].state_dict(), "curriculum": cur.state_dict()}


def _concat(batches):
    """The step's samples as one (G, L) array per key, sorted by tokens: independent of (dp, mbs)."""
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.lexsort(merged["tokens"].T[::-1])
    return {k: v[order] for k, v in merged.items()}


def _same(a, b):
    assert len(a) == len(b)
    for (la, pa, ba), (lb, pb, bb) in zip(a, b):
        assert (la, pa) == (lb, pb)
        for k in ba:
            np.testing.assert_array_equal(ba[k], bb[k])


def test_resume_replays_the_uninterrupted_stream_with_curriculum(setup):
    cfg, train = setup
    full, _ = _run(cfg, train, dp=2, mbs=2, steps=30)
    lengths = [length for length, _, _ in full]
    assert lengths[0] == 8 and lengths[-1] == 32 and lengths == sorted(lengths)  # the warmup happened
    assert {phase for _, phase, _ in full} == {0, 1}  # and the mixing phase switched in-run
    assert all(b["tokens"].shape == (GBS, length) for length, _, b in full)
    first, state = _run(cfg, train, dp=2, mbs=2, steps=11)
    assert state["sampler"]["consumed_samples"] == 11 * GBS and state["curriculum"]["iteration"] == 11
    # Resume on another decomposition (dp 3, micro 4): the same global stream continues.
    rest, _ = _run(cfg, train, dp=3, mbs=4, steps=19, state=state)
    _same(first + rest, full)


def test_sampler_errors():
    with pytest.raises(UserError, match="not divisible"):
        PretrainingSampler(100, 0, 2, 0, 3, 10)
    with pytest.raises(UserError, match="rank 2 is outside"):
        PretrainingSampler(100, 0, 1, 2, 2, 2)
    with pytest.raises(UserError, match="0 samples"):
        PretrainingSampler(0, 0, 1, 0, 1)
    with pytest.raises(UserError, match="consumed 500 samples"):
        PretrainingSampler(100, 0, 1, 0, 1).load_state_dict({"consumed_samples": 500})


def _ds_seqlen(step, start, full, total, multiple, root=None):
    """DeepSpeed's fixed_linear / fixed_root difficulty, written out independently."""
    if step >= total:
        return full
    p = step / total if root is None else (step / total) ** (1 / root)
    value = int(start + p * (full - start))
    value -= value % multiple
    return min(full, max(start, value))


@pytest.mark.parametrize("root", [None, 3])
def test_step_warmup_matches_deepspeed_formula(root):
    cur = Curriculum(seq_length=1000, global_batch_size=5, seqlen_start=64, warmup_steps=300, multiple=8,
                     schedule="fixed_root" if root else "fixed_linear", root_degree=root or 2)
    tokens = 0
    for step in range(400):
        expect = _ds_seqlen(step, 64, 1000, 300, 8, root)
        assert cur.seqlen_at(step) == expect and cur.tokens_before(step) == tokens
        tokens += 5 * expect
    for target in (0, 1, 320, 5000, 123456, 10 ** 7):
        brute = next(s for s in range(10 ** 6) if cur.tokens_before(s) >= target)
        assert cur.first_step_after_tokens(target) == brute


def test_token_warmup_and_state(caplog):
    cur = Curriculum(seq_length=512, global_batch_size=3, seqlen_start=16, warmup_tokens=50000)
    tokens = 0
    for step in range(600):
        expect = 512 if tokens >= 50000 else max(16, (lambda v: v - v % 8)(int(16 + tokens / 50000 * 496)))
        assert cur.seqlen == expect and cur.consumed_tokens == tokens
        tokens += 3 * expect
        cur.step()
    state = cur.state_dict()
    again = Curriculum(seq_length=512, global_batch_size=3, seqlen_start=16, warmup_tokens=50000)
    again.load_state_dict(state)
    assert again.state_dict() == state
    changed = Curriculum(seq_length=512, global_batch_size=3, seqlen_start=32, warmup_tokens=50000)
    changed.load_state_dict(state)  # flags changed since the checkpoint: the new schedule rules, loudly
    assert changed.iteration == 600 and "curriculum flags changed" in caplog.text
    batch = {"tokens": np.zeros((2, 512)), "document_ids": np.zeros((2, 512), np.int64)}
    cut = Curriculum(seq_length=512, global_batch_size=3, seqlen_start=16, warmup_tokens=50000).truncate(batch)
    assert cut["tokens"].shape == (2, 16) and cut["document_ids"].shape == (2, 16)
    assert cur.truncate(batch) is batch  # full length: untouched


def test_skipped_global_batches_are_passed_over_and_resume():
    """The loss-spike rollback's skip list: iterator, advance(), batch_start() and a resume all pass over it."""
    s = PretrainingSampler(120, 0, 3, 1, 2, GBS)  # rank 1 of 2: samples 3..5 of each 6 of a micro step
    s.skip([24, 36])
    firsts = [b[0] for b in list(iter(s))[::2]]  # the first micro-batch of each global batch
    assert firsts == [3, 15, 51, 63, 75, 87, 99, 111]
    assert [s.batch_start(k) for k in range(4)] == [0, 12, 48, 60]
    s.advance()
    s.advance()  # 24 and 36 are skipped: the position jumps past them
    assert s.consumed_samples == 48
    resumed = PretrainingSampler(120, 0, 3, 1, 2, GBS)
    resumed.load_state_dict(s.state_dict())
    assert resumed.skipped == [24, 36] and next(iter(resumed)) == [51, 52, 53]
    with pytest.raises(ValueError, match="samples up to 48 are consumed"):
        s.skip([36])
