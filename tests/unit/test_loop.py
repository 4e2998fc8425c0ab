"""The training loop (megaclm.training.loop.Trainer) driven by fakes: no DeepSpeed, no processes.

FakeEngine's per-token loss is scripted by the global batch's first sample (the tokens carry it), plus
its one "weight", which every applied step moves: a skipped step (non-finite gradients) leaves it, so
losses show which updates were applied. The checkpoint functions are replaced by an in-memory store that
keeps the client state and the weight, so save -> restore (resume, rollback) is a real round trip through
every part's state_dict/load_state_dict.
"""
import copy
import dataclasses
import math
import signal
from types import SimpleNamespace

import pytest
import torch

import megaclm.training.checkpointer as checkpointer_module
from megaclm.checkpoint.layout import tag_for
from megaclm.config import MegaclmConfig
from megaclm.config.checkpoint import CheckpointConfig
from megaclm.config.data import DataConfig
from megaclm.config.logging import LoggingConfig
from megaclm.config.resilience import ResilienceConfig
from megaclm.config.training import TrainingConfig
from megaclm.training.callbacks import ROLLBACK, Profiler, load_callbacks
from megaclm.training.loop import Trainer
from megaclm.training.progress import Progress, TrainingDiverged
from megaclm.utils import signals
from megaclm.utils.errors import UserError

GBS, SEQ = 4, 8
EVAL_LOSS = 2.0


class FakeEngine:
    def __init__(self, script):
        self.script = script  # first sample of the global batch -> its loss before the weight's part
        self.weight = 0.0
        self.module = SimpleNamespace(parameters=lambda: [torch.ones(3)])
        self.optimizer = SimpleNamespace(param_groups=[{}])
        self.applied, self.pending_finite, self.backwards = True, True, 0

    def __call__(self, tokens, position_ids=None, document_ids=None, labels=None):
        first = int(tokens[0, 0])
        loss = EVAL_LOSS if first < 0 else self.script(first) + self.weight
        return torch.full(tokens.shape, float(loss))

    def backward(self, loss):
        self.backwards += 1
        self.pending_finite = bool(torch.isfinite(loss))

    def step(self):  # DeepSpeed's optimizers skip a step with non-finite gradients
        self.applied = self.pending_finite
        if self.applied:
            self.weight += 0.01

    def was_step_applied(self):
        return self.applied

    def train(self):
        pass

    def eval(self):
        pass

    def get_global_grad_norm(self):
        return 1.0

    def fp16_enabled(self):
        return False


class FakeData:
    """One micro-batch per step; the sampler's skip list as in megaclm.data.sampler."""

    def __init__(self):
        self.consumed_samples, self.skip = 0, []
        self.curriculum = SimpleNamespace(phase_at=lambda it: 0)

    def _past_skipped(self):
        while self.consumed_samples in self.skip:
            self.consumed_samples += GBS

    def micro_batches(self, consumed, seq):
        tokens = torch.full((GBS, seq), consumed)
        yield {"tokens": tokens, "position_ids": None, "labels": tokens, "loss_mask": torch.ones(GBS, seq)}

    def eval_micro_batches(self, split, index, seq):
        tokens = torch.full((GBS, seq), -1)
        return iter([{"tokens": tokens, "position_ids": None, "labels": tokens, "loss_mask": torch.ones(GBS, seq)}])

    def advance(self):
        self.consumed_samples += GBS
        self._past_skipped()

    def skip_batches(self, starts):
        self.skip += starts
        self._past_skipped()

    def state_dict(self):
        return {"consumed": self.consumed_samples, "skip": list(self.skip)}

    def load_state_dict(self, state):
        self.consumed_samples, self.skip = state["consumed"], list(state["skip"])

    def seq_length_at(self, progress):
        return SEQ

    def has_split(self, split):
        return True

    def phase_line(self, iteration):
        return "data phase 0"

    def data_fields(self, iteration, consumed):
        return {}

    def epoch(self, consumed):
        return None


class FakeMetrics:
    def __init__(self):
        self.rows, self.evals, self.events = [], [], []

    def step(self, loss):
        pass

    def train(self, row):
        self.rows.append(row)

    def evaluation(self, iteration, split, loss):
        self.evals.append((iteration, split, loss))

    def event(self, row, text):
        self.events.append(row)


class Store:
    """In-memory stand-in for megaclm.checkpoint.deepspeed_ckpt's save/load and `latest`."""

    def __init__(self):
        self.saved, self.latest, self.loads, self.gathered = {}, None, [], []

    def save_checkpoint(self, engine, save_dir, iteration, client, *, on_complete=None, files_written=None,
                        layout_independent=False, **kw):
        tag = tag_for(iteration)
        self.saved[tag] = (copy.deepcopy(client), engine.weight)
        if layout_independent:
            self.gathered.append(tag)
        if files_written is not None:
            files_written()
        self.latest = tag
        if on_complete is not None:
            on_complete()
        return tag

    def load_checkpoint(self, engine, directory, tag, layout=None, **options):
        self.loads.append(tag)
        client, engine.weight = self.saved[tag]
        return {**copy.deepcopy(client), "rng": None}


@pytest.fixture
def store(monkeypatch):
    s = Store()
    monkeypatch.setattr(checkpointer_module, "save_checkpoint", s.save_checkpoint)
    monkeypatch.setattr(checkpointer_module, "load_checkpoint", s.load_checkpoint)
    monkeypatch.setattr(checkpointer_module, "read_latest", lambda save: s.latest)
    monkeypatch.setattr(checkpointer_module, "run_layout", lambda pstate, zero: None)
    monkeypatch.setattr(checkpointer_module, "mark_best", lambda save, tag, loss: None)
    monkeypatch.setattr(signals.requests, "received", None)
    return s


def steady(first_sample):
    """A healthy loss that varies a little (the spike guard needs a spread)."""
    return 1.0 + 0.01 * ((first_sample // GBS) % 3)


def make(tmp_path, script=steady, callbacks=(), progress=None, **fields):
    """`fields`: fields of the training, resilience, logging and checkpoint sections, by name."""
    fields = {"train_iters": 6, "eval_interval": 1000, "eval_iters": 1, "hang_timeout_s": 0, "log_interval": 1,
              "save": str(tmp_path), **fields}
    sections = {name: cls(**{f.name: fields.pop(f.name) for f in dataclasses.fields(cls) if f.name in fields})
                for name, cls in (("training", TrainingConfig), ("resilience", ResilienceConfig),
                                  ("logging", LoggingConfig), ("checkpoint", CheckpointConfig))}
    assert not fields, f"no section has the fields {sorted(fields)}"
    cfg = MegaclmConfig(data=DataConfig(seq_length=SEQ), **sections)
    derived = SimpleNamespace(grad_accum_steps=1, global_batch_size=GBS, train_iters=cfg.training.train_iters)
    pstate = SimpleNamespace(pp_size=1, dp_size=1, cp_size=1, rank=0, world_size=1, is_first_stage=True,
                             is_last_stage=True)
    schedule = SimpleNamespace(lr=lambda it, tokens: 1e-3, decoupled_lr=lambda it, tokens: 1e-3)
    return Trainer(cfg, derived, FakeEngine(script), pstate, FakeData(), schedule, FakeMetrics(),
                   progress or Progress(), flops_per_token=lambda seq: 1.0, peak_tflops=None, checkpoint_meta={},
                   callbacks=list(callbacks))


def losses(trainer):
    return {r["iteration"]: r["loss"] for r in trainer.metrics.rows}


# ---- stop conditions --------------------------------------------------------------------------------------


def test_runs_to_train_iters_logs_every_step_evaluates_and_saves_at_the_end(tmp_path, store):
    t = make(tmp_path)
    assert t.train() == "finished"
    assert t.progress.iteration == 6 and t.progress.consumed_samples == 6 * GBS and t.progress.consumed_tokens == 6 * GBS * SEQ
    assert sorted(losses(t)) == [1, 2, 3, 4, 5, 6]
    assert losses(t)[2] == pytest.approx(steady(GBS) + 0.01)  # one applied update before it
    assert [(it, split) for it, split, _ in t.metrics.evals] == [(6, "val"), (6, "test")]
    assert list(store.saved) == [tag_for(6)]


def test_log_interval_windows_cover_every_step(tmp_path, store):
    t = make(tmp_path, log_interval=4, train_iters=6)
    t.train()
    rows = t.metrics.rows
    assert [(r["iteration"], r["window_start"]) for r in rows] == [(1, 1), (4, 2), (6, 5)]
    assert rows[1]["loss"] == pytest.approx(sum(steady(GBS * i) + 0.01 * i for i in (1, 2, 3)) / 3)


def test_exit_interval_saves_and_stops(tmp_path, store):
    t = make(tmp_path, exit_interval=2, train_iters=10)
    assert t.train() == "--exit-interval 2"
    assert t.progress.iteration == 2 and list(store.saved) == [tag_for(2)] and t.metrics.evals == []


def test_duration_limit_saves_and_stops(tmp_path, store):
    t = make(tmp_path, exit_duration_in_mins=1.0, train_iters=10)
    t.start_time -= 120  # the run started two minutes ago
    assert t.train() == "--exit-duration-in-mins 1.0"
    assert t.progress.iteration == 1 and list(store.saved) == [tag_for(1)]


class SignalAt:
    def __init__(self, iteration):
        self.iteration = iteration

    def post_step(self, trainer, result):
        if trainer.progress.iteration == self.iteration:
            signals.requests.received = signal.SIGTERM  # as the handler records it


def test_signal_saves_after_the_step_and_skips_the_final_evaluation(tmp_path, store):
    t = make(tmp_path, callbacks=[SignalAt(3)], train_iters=10, eval_interval=5)
    assert t.train() == "SIGTERM"
    assert t.progress.iteration == 3 and list(store.saved) == [tag_for(3)] and t.metrics.evals == []


def test_signal_during_evaluation_abandons_it_saves_and_reports_it(tmp_path, store):
    t = make(tmp_path, callbacks=[SignalAt(6)], train_iters=6)
    assert t.train() == "SIGTERM"  # stopped during the final evaluation: not finished
    assert t.metrics.evals == [] and list(store.saved) == [tag_for(6)]


# ---- cadence ---------------------------------------------------------------------------------------------


class Seen:
    """Records the hooks the loop calls."""

    def __init__(self):
        self.calls = []

    def post_eval(self, trainer, split, loss):
        self.calls.append(("eval", trainer.progress.iteration, split, loss))

    def post_checkpoint_saved(self, trainer, tag):
        self.calls.append(("saved", trainer.progress.iteration, tag))

    def checkpoint_files_written(self, tag):
        self.calls.append(("files", tag))


def test_eval_and_save_cadence(tmp_path, store):
    seen = Seen()
    t = make(tmp_path, callbacks=[seen], train_iters=6, eval_interval=2, save_interval=3)
    t.train()
    assert seen.calls == [("eval", 2, "valid", EVAL_LOSS), ("files", tag_for(3)), ("saved", 3, tag_for(3)),
                          ("eval", 4, "valid", EVAL_LOSS), ("files", tag_for(6)), ("saved", 6, tag_for(6)),
                          ("eval", 6, "valid", EVAL_LOSS), ("eval", 6, "test", EVAL_LOSS)]
    assert list(store.saved) == [tag_for(3), tag_for(6)]  # the final save found iteration 6 saved
    assert store.gathered == []  # by default a save writes DeepSpeed's files only


def test_every_nth_save_writes_the_layout_independent_files(tmp_path, store):
    t = make(tmp_path, train_iters=7, save_interval=1, save_layout_independent_interval=3)
    t.train()
    assert list(store.saved) == [tag_for(i) for i in range(1, 8)]
    assert store.gathered == [tag_for(3), tag_for(6)]


# ---- NaN/inf steps ---------------------------------------------------------------------------------------


def nan_at(*samples):
    return lambda first: float("nan") if first in samples else steady(first)


def test_nan_steps_are_skipped_counted_and_not_saved(tmp_path, store):
    t = make(tmp_path, script=nan_at(GBS, 2 * GBS), train_iters=6, save_interval=3)  # iterations 2 and 3
    assert t.train() == "finished"
    assert t.progress.skipped_steps == 2 and t.engine.weight == pytest.approx(4 * 0.01)  # 2 updates skipped
    assert losses(t)[2] is None and losses(t)[3] is None  # the window of a bad step has no loss
    # iteration 3's save is deferred to the next healthy step, 4; 6 saved on schedule
    assert list(store.saved) == [tag_for(4), tag_for(6)]


def test_too_many_nan_steps_in_a_row_stop_the_run(tmp_path, store):
    t = make(tmp_path, script=nan_at(2 * GBS, 3 * GBS, 4 * GBS), train_iters=10, max_consecutive_nan_steps=3,
             save_interval=1)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive iterations \(up to 5\).* last healthy checkpoint, "
                                                + str(tmp_path / tag_for(2))):
        t.train()
    assert list(store.saved) == [tag_for(1), tag_for(2)]


def test_a_run_that_ends_in_a_nan_streak_is_not_saved(tmp_path, store):
    t = make(tmp_path, script=nan_at(5 * GBS), train_iters=6, save_interval=4)
    assert t.train() == "finished"
    assert t.checkpointer.end_unsaved and list(store.saved) == [tag_for(4)]


# ---- loss spikes: skip, then roll back through the restore path ------------------------------------------


def test_spikes_skip_updates_then_roll_back_and_pass_over_the_batches(tmp_path, store):
    spikes = (7 * GBS, 8 * GBS)  # iterations 8 and 9
    t = make(tmp_path, script=lambda first: 10 * steady(first) if first in spikes else steady(first),
             train_iters=12, save_interval=4, spike_zscore=4.0, spike_window=4, spike_action="rollback",
             spike_rollback_after=2)
    assert t.train() == "finished"
    assert store.loads == [tag_for(4)]  # the restore path read the last checkpoint (8's save fell in the streak)
    [event] = t.metrics.events
    assert event["rollback"] == 1 and event["rollback_to"] == tag_for(4) and event["iteration"] == 4
    assert [b["samples"] for b in event["skipped_batches"]] == [[7 * GBS, 8 * GBS - 1], [8 * GBS, 9 * GBS - 1]]
    assert t.progress.rollbacks == 1 and t.data.skip == list(spikes)
    # the 4 steps after the rollback read the batches after the skipped ones, with 12 updates applied in all
    assert t.progress.iteration == 12 and t.progress.consumed_samples == 14 * GBS
    assert t.engine.weight == pytest.approx(12 * 0.01)
    rows = [(r["iteration"], r["loss"]) for r in t.metrics.rows]
    assert [it for it, _ in rows] == list(range(1, 10)) + list(range(5, 13))  # the spike streak logged, then the replay
    assert rows[9:12] == rows[4:7]  # iterations 5-7 replayed exactly


def test_spikes_without_a_checkpoint_stop_the_run(tmp_path, store):
    t = make(tmp_path, script=lambda first: 10.0 if first >= 6 * GBS else steady(first), train_iters=12,
             spike_zscore=4.0, spike_window=4, spike_action="rollback", spike_rollback_after=2)
    with pytest.raises(TrainingDiverged, match="2 loss spikes in a row .* no checkpoint"):
        t.train()


# ---- resume: every part's state through the checkpoint ---------------------------------------------------


def test_resume_continues_bit_identically(tmp_path, store):
    whole = make(tmp_path / "whole", train_iters=8, spike_zscore=4.0, spike_window=2)
    whole.train()
    first = make(tmp_path / "run", exit_interval=4, train_iters=8, spike_zscore=4.0, spike_window=2)
    assert first.train() == "--exit-interval 4"
    client = store.saved[tag_for(4)][0]
    assert list(client) == ["progress", "data", "world_size", "spike"]  # today's client-state keys, in order
    resumed = make(tmp_path / "run", train_iters=8, spike_zscore=4.0, spike_window=2)
    resumed.checkpointer.restore(store.load_checkpoint(resumed.engine, str(tmp_path / "run"), tag_for(4)))
    assert resumed.progress == first.progress and resumed.data.state_dict() == first.data.state_dict()
    assert resumed.guard.state_dict() == first.guard.state_dict()
    resumed.train()
    assert {i: losses(resumed)[i] for i in range(5, 9)} == {i: losses(whole)[i] for i in range(5, 9)}


# ---- callbacks -------------------------------------------------------------------------------------------


def test_user_callbacks_load_from_a_spec_and_inject_faults(tmp_path, store, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1]))  # tests/: faults.py
    [nan] = load_callbacks(["faults:nan_iters=2"])
    t = make(tmp_path, callbacks=[nan], train_iters=3)
    t.train()
    assert t.progress.skipped_steps == 1 and losses(t)[2] is None and math.isfinite(losses(t)[3])


@pytest.mark.parametrize("spec, message", [
    ("faults", "write pkg.module:factory"),
    ("no_such_module_here:f", "cannot import no_such_module_here"),
    ("math:no_such_factory", "math has no callable no_such_factory"),
])
def test_bad_callback_specs_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        load_callbacks([spec])


def test_a_callback_answering_nonsense_is_refused(tmp_path, store):
    class Wrong:
        def post_step(self, trainer, result):
            return "stop"

    with pytest.raises(ValueError, match=f"returned 'stop'; return None or '{ROLLBACK}'"):
        make(tmp_path, callbacks=[Wrong()]).train()


def test_the_config_takes_callbacks_from_flags():
    from megaclm.config import parse_config
    cfg, _ = parse_config(["--train-iters", "1", "--callbacks", "a.b:c", "d:e=1,2"], sections=["training"])
    assert cfg.training.callbacks == ["a.b:c", "d:e=1,2"]


class StopBelow:  # README's example of a user callback
    def __init__(self, loss):
        self.loss, self.low = loss, False

    def post_step(self, trainer, result):
        self.low = result.loss < self.loss

    def should_stop(self, trainer):
        return f"loss below {self.loss}" if self.low else None


def test_a_user_callback_can_stop_the_run_which_saves_first(tmp_path, store):
    def falling(first):  # iteration k: 2.0 - 0.09 (k - 1), the updates' 0.01 each included
        return 2.0 - 0.1 * first / GBS

    t = make(tmp_path, script=falling, callbacks=[StopBelow(1.75)], train_iters=10)
    assert t.train() == "loss below 1.75"
    assert t.progress.iteration == 4 and list(store.saved) == [tag_for(4)]


def test_pretrain_gpt_refuses_a_callback_it_cannot_import_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "pretrain_gpt.py", "--validate-only", "--mock-data", "--num-layers", "2",
                          "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
                          "--max-position-embeddings", "64", "--train-iters", "4", "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", "100", "--callbacks", "no_such_module_here:f"],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --callbacks 'no_such_module_here:f': cannot import no_such_module_here (No module named "
                      "'no_such_module_here'); put its directory on PYTHONPATH"], out.stderr[-2000:]


# ---- profiler ----------------------------------------------------------------------------------------------


def _step_ranges(trace_path) -> list[str]:
    """The `iteration N` ranges of a chrome trace, in order (the file must be whole JSON)."""
    import json
    events = json.loads(trace_path.read_text())["traceEvents"]
    return [e["name"] for e in events if e.get("name", "").startswith("iteration ") and e.get("ph") == "X"]


def test_the_profiler_traces_the_steps_asked_on_the_ranks_asked(tmp_path, store, caplog):
    """--profile-step-start 2 --profile-step-end 4: iterations 3 and 4, one trace, the op table in the log."""
    profile = dict(profile=True, use_pytorch_profiler=True, profile_step_start=2, profile_step_end=4,
                   profile_dir=str(tmp_path / "prof"))
    with caplog.at_level("INFO", logger="megaclm.train"):
        make(tmp_path, train_iters=6, **profile).train()
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["rank0.iter3-4.pt.trace.json"]
    assert _step_ranges(tmp_path / "prof/rank0.iter3-4.pt.trace.json") == ["iteration 3", "iteration 4"]
    assert any("iterations 3-4 traced to" in r.getMessage() and "Self CPU" in r.getMessage() for r in caplog.records)
    # Rank 0 is not among --profile-ranks: no profiler callback at all, no file.
    other = make(tmp_path / "other", train_iters=6,
                 **{**profile, "profile_ranks": [1], "profile_dir": str(tmp_path / "p1")})
    assert not [c for c in other.callbacks.callbacks if isinstance(c, Profiler)]
    other.train()
    assert not (tmp_path / "p1").exists()


def test_a_run_stopped_inside_the_profiled_steps_keeps_its_trace(tmp_path, store):
    make(tmp_path, train_iters=10, exit_interval=3, profile=True, use_pytorch_profiler=True, profile_step_start=1,
         profile_step_end=6, profile_dir=str(tmp_path / "prof")).train()
    assert _step_ranges(tmp_path / "prof/rank0.iter2-3.pt.trace.json") == ["iteration 2", "iteration 3"]


def test_the_nsight_range_opens_before_and_closes_after_the_steps_asked(tmp_path, store, monkeypatch):
    """Without --use-pytorch-profiler: cudaProfilerStart before iteration 3, cudaProfilerStop after iteration 4."""
    calls = []

    class Nvtx:
        def __init__(self, record_shapes):
            calls.append("nvtx")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append("nvtx end")

    class Step:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            calls.append(self.name)

        def __exit__(self, *exc):
            pass

    cudart = SimpleNamespace(cudaProfilerStart=lambda: calls.append("start"),
                             cudaProfilerStop=lambda: calls.append("stop"))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.autograd.profiler, "emit_nvtx", Nvtx)
    monkeypatch.setattr(torch.profiler, "record_function", Step)
    make(tmp_path, train_iters=6, profile=True, profile_step_start=2, profile_step_end=4).train()
    assert calls == ["start", "nvtx", "iteration 3", "iteration 4", "nvtx end", "stop"]


def test_profiling_steps_before_the_resumed_iteration_is_said_and_does_nothing(tmp_path, store, caplog):
    with caplog.at_level("WARNING", logger="megaclm.train"):
        make(tmp_path, progress=Progress(iteration=5), train_iters=6, profile=True, use_pytorch_profiler=True,
             profile_step_start=2, profile_step_end=4, profile_dir=str(tmp_path / "prof")).train()
    assert not (tmp_path / "prof").exists()
    assert any("iterations 3-4 are before this run's first step (6); nothing is profiled" in r.getMessage()
               for r in caplog.records)
