"""megaclm.checkpoint.from_deepspeed on 2 gloo ranks: the layout-independent files it makes from DeepSpeed's files
equal, tensor for tensor, the ones a gathering save writes (--save-layout-independent-interval, the reference),
for ZeRO 0-3 x fp32/bf16 at DP=2, and TP=2 / PP=2; DeepSpeed's own zero_to_fp32 reads the same checkpoints.

Each case builds megaclm's engine (megaclm.training.engine, as pretrain_gpt.py does), takes two Adam steps
(lr > 0: the moments and masters differ from the init), saves once with the gather, and the test converts the
tag's DeepSpeed files offline into another folder and compares.
"""
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import unittest.mock

import pytest
import torch

from mp_harness import run_ranks

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                           "torch_extensions"))

from megaclm.config.model import ModelConfig  # noqa: E402

MODEL = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                    max_position_embeddings=32, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                    add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0)
VOCAB = 200
TAG = "iter_0000002"
DEFAULT_TAG = "iter_0000003"  # MoE cases: saved after TAG without the gather, nothing trained in between
# bf16 at ZeRO-0 without a pipeline is DeepSpeed's FP16_Optimizer; with one (and at ZeRO-1) its BF16_Optimizer.
FP16_OPTIMIZER = {"zero0 dp2 bf16", "zero0 tp2 bf16"}
# name: (tp, pp, zero stage, bf16)
CASES = {f"zero{z} dp2 {'bf16' if b else 'fp32'}": (1, 1, z, b) for z in range(4) for b in (False, True)}
CASES.update({"zero1 tp2 fp32": (2, 1, 1, False), "zero0 tp2 bf16": (2, 1, 0, True),
              "zero0 pp2 fp32": (1, 2, 0, False), "zero0 pp2 bf16": (1, 2, 0, True), "zero1 pp2 bf16": (1, 2, 1, True)})
# MoE (4 routed experts in each layer, a gated shared expert): DeepSpeed writes the routed experts in files of their
# own and, at ZeRO-1/2, partitions their optimizer states over the expert-data-parallel group. LoRA (attention
# adapters; the frozen experts are no DeepSpeed MoE layers): the adapters only. name: (pp, ep, zero, bf16, lora)
MOE_MODEL = dataclasses.replace(MODEL, num_experts=4, moe_shared_expert_intermediate_size=32,
                                moe_shared_expert_gate=True)
MOE_CASES = {f"moe{' lora' if lora else ''} zero{z} {f'pp{pp}' if pp > 1 else f'ep{ep}'} {'bf16' if b else 'fp32'}":
             (pp, ep, z, b, lora)
             for pp, ep, z, b, lora in ((1, 1, 1, False, False), (1, 2, 1, False, False), (1, 2, 2, True, False),
                                        (1, 2, 0, False, False), (1, 2, 0, True, False), (1, 1, 0, True, False),
                                        (2, 1, 0, False, False), (2, 1, 1, True, False), (1, 1, 0, False, True),
                                        (1, 2, 1, False, True))}


def _config(tp: int, pp: int, zero: int, bf16: bool, ep: int = 1, model: "ModelConfig" = MODEL, lora: bool = False):
    from megaclm.config import MegaclmConfig
    from megaclm.config.data import DataConfig
    from megaclm.config.lora import LoraConfig
    from megaclm.config.optimizer import OptimizerConfig
    from megaclm.config.parallel import ParallelConfig
    from megaclm.config.precision import PrecisionConfig
    from megaclm.config.training import TrainingConfig
    from megaclm.config.zero import ZeroConfig

    return MegaclmConfig(model=model, data=DataConfig(seq_length=16),
                         parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep),
                         optimizer=OptimizerConfig(lr=1e-2),
                         training=TrainingConfig(micro_batch_size=2, global_batch_size=4 // (tp * pp), train_iters=4),
                         precision=PrecisionConfig(bf16=bf16),
                         lora=LoraConfig(lora_rank=4, lora_target="qkv,proj") if lora else LoraConfig(),
                         zero=ZeroConfig(zero_stage=zero, zero_param_persistence_threshold=0))


def worker(rank, world, root, moe=False):
    from megaclm.checkpoint.deepspeed_ckpt import save_checkpoint
    from megaclm.config import compute_derived
    from megaclm.config.deepspeed_json import deepspeed_config
    from megaclm.training.engine import build_engine, build_model, init_distributed

    configs = ({name: _config(1, pp, zero, bf16, ep, MOE_MODEL, lora)
                for name, (pp, ep, zero, bf16, lora) in MOE_CASES.items()} if moe
               else {name: _config(*case) for name, case in CASES.items()})
    for name, cfg in configs.items():
        tp, pp, zero = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                        cfg.zero.zero_stage)
        derived = compute_derived(cfg, world, vocab_size=VOCAB)
        pstate = init_distributed(cfg)
        ds = deepspeed_config(cfg, derived, cuda=False)
        engine = build_engine(cfg, build_model(cfg, derived.padded_vocab_size, pstate, ds), pstate, ds)
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(pstate.dp_rank))
        for _ in range(2):
            if pp > 1:
                pos = torch.arange(16).expand(2, 16)
                engine.train_batch(data_iter=itertools.repeat(((ids, pos), (ids, torch.ones(2, 16)))))
            else:
                engine.backward(engine(ids, labels=ids).float().mean())
                engine.step()
        meta = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": pstate.dp_size,
                "expert_model_parallel_size": cfg.parallel.expert_model_parallel_size, "zero_stage": zero,
                "padded_vocab_size": derived.padded_vocab_size}
        if cfg.lora.enabled:  # a LoRA save writes the adapters only (the base is another checkpoint)
            meta["lora_base"] = {"dir": "unused", "tag": TAG}
        for iteration in (2, 3) if moe else (2,):  # MoE: also a default save of the same state (DEFAULT_TAG)
            save_checkpoint(engine, os.path.join(root, name), iteration, {}, pstate=pstate, config_tree=cfg.to_dict(),
                            meta=meta, layout_independent=iteration == 2)
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("from_deepspeed"))
    run_ranks(2, worker, root, timeout=600)
    return root


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("from_deepspeed_moe"))
    run_ranks(2, worker, root, True, timeout=600)
    return root


def _files(folder: str) -> dict:
    return {name: torch.load(os.path.join(folder, name), weights_only=False) for name in sorted(os.listdir(folder))}


def _default_save(saved: str, case: str, dest) -> str:
    """A copy of a case's checkpoint as a default save leaves it: DeepSpeed's files and megaclm's small ones."""
    ckpt = str(dest)
    shutil.copytree(os.path.join(saved, case), ckpt)
    for kind in ("model", "optim"):
        shutil.rmtree(os.path.join(ckpt, TAG, "megaclm", kind))
    path = os.path.join(ckpt, TAG, "megaclm", "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(("megaclm/model/",
                                                                                          "megaclm/optim/"))}
    with open(path, "w") as f:
        json.dump(manifest, f)
    return ckpt


def _assert_converted_equal_gathered(ckpt: str, out: str, fp16_optimizer: bool) -> None:
    """`out`'s converted files == `ckpt`'s gathered ones, tensor for tensor (`fp16_optimizer`: see below)."""
    for kind, fields in (("model", ("tensors",)), ("optim", ("exp_avg", "exp_avg_sq"))):
        want, got = _files(os.path.join(ckpt, TAG, "megaclm", kind)), _files(os.path.join(out, TAG, "megaclm", kind))
        assert list(got) == list(want) and all(any(want[name][field] for name in want) for field in fields)
        for name in want:  # (a LoRA run's EP rank > 0 files are empty: its experts are frozen, in the base)
            for field in fields:
                assert sorted(got[name][field]) == sorted(want[name][field]), (name, field)
                for key, tensor in want[name][field].items():
                    mine = got[name][field][key]
                    assert mine.dtype == torch.float32 and not mine.requires_grad
                    if field == "tensors" and fp16_optimizer:
                        # The gathering save writes the bf16 module weights (DeepSpeed's FP16_Optimizer has no
                        # fp32 view of a parameter), the conversion the fp32 masters.
                        assert not torch.equal(mine, tensor) and torch.equal(mine.bfloat16().float(), tensor), key
                        continue
                    assert torch.equal(mine, tensor), (name, field, key)
            if kind == "optim":
                assert got[name]["step"] == want[name]["step"] == 2
            rest = {k: v for k, v in want[name].items() if k not in fields}
            assert {k: got[name][k] for k in rest} == rest


@pytest.mark.parametrize("case", list(CASES))
def test_converted_files_equal_the_gathered_ones(saved, case, tmp_path):
    from megaclm.checkpoint.from_deepspeed import convert

    ckpt = os.path.join(saved, case)
    _assert_converted_equal_gathered(ckpt, convert(ckpt, TAG, str(tmp_path / "out")), case in FP16_OPTIMIZER)


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_converted_moe_files_equal_the_gathered_ones(saved_moe, case, tmp_path):
    """Routed experts by global id, EP rank r > 0's in their own files; the shared expert with the dense weights."""
    from megaclm.checkpoint.from_deepspeed import convert

    ckpt = os.path.join(saved_moe, case)
    out = convert(ckpt, TAG, str(tmp_path / "out"))
    pp, ep, zero, bf16, _ = MOE_CASES[case]
    assert sorted(os.listdir(os.path.join(out, TAG, "megaclm", "model"))) == (
        ["tp00_pp000.pt", "tp00_pp000_ep001.pt"] if ep == 2 else [f"tp00_pp{s:03d}.pt" for s in range(pp)])
    _assert_converted_equal_gathered(ckpt, out, zero == 0 and bf16 and pp == 1)


def _work_folders(ckpt: str, tag: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(ckpt, tag, "megaclm")) if n.startswith(".convert."))


def test_a_default_moe_save_writes_deepspeeds_files_only_and_converts_in_place(saved_moe, tmp_path):
    """The save of an MoE run does not gather; its conversion in place equals the gathered files of the same state.
    The work folders that killed conversions left behind go (at the next conversion, or the next save's
    cleanup); a live converter's stays."""
    import time

    from megaclm.checkpoint.deepspeed_ckpt import remove_partial_tags
    from megaclm.checkpoint.from_deepspeed import STALE_CONVERSION_S, ensure_shards
    from megaclm.checkpoint.layout import convert_tmp_name
    from megaclm.utils.signals import process_start_time

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(saved_moe, "moe zero1 ep2 fp32"), ckpt)
    own = os.path.join(ckpt, DEFAULT_TAG, "megaclm")
    assert sorted(os.listdir(own)) == ["config.json", "manifest.json", "meta.json", "rng"]
    host, me = "this-host", (os.getpid(), process_start_time(os.getpid()))
    work = {"dead": convert_tmp_name(host, me[0], me[1] + 1, "a1"),  # the pid now runs another process
            "live": convert_tmp_name(host, *me, "b2"),
            "away": convert_tmp_name("other-host", 1, 5, "c3"),  # another host's, busy a minute ago
            "gone": convert_tmp_name("other-host", 2, 5, "d4")}  # and one untouched for longer than the limit
    for tag in (TAG, DEFAULT_TAG):
        for name in work.values():
            os.makedirs(os.path.join(ckpt, tag, "megaclm", name, "model"))
            old = time.time() - (STALE_CONVERSION_S + 60 if name == work["gone"] else 60)
            for path in (os.path.join(ckpt, tag, "megaclm", name, "model"), os.path.join(ckpt, tag, "megaclm", name)):
                os.utime(path, (old, old))
    with unittest.mock.patch("socket.gethostname", return_value=host):
        assert ensure_shards(ckpt, DEFAULT_TAG) == ckpt
        assert _work_folders(ckpt, DEFAULT_TAG) == sorted([work["live"], work["away"]])
        assert _work_folders(ckpt, TAG) == sorted(work.values())
        assert remove_partial_tags(ckpt) == []  # the save-time cleanup, of every tag
        assert _work_folders(ckpt, TAG) == sorted([work["live"], work["away"]])
    for kind, fields in (("model", ("tensors",)), ("optim", ("exp_avg", "exp_avg_sq"))):
        want, got = _files(os.path.join(ckpt, TAG, "megaclm", kind)), _files(os.path.join(own, kind))
        assert list(got) == list(want) == ["tp00_pp000.pt", "tp00_pp000_ep001.pt"]
        for name in want:
            for field in fields:
                assert sorted(got[name][field]) == sorted(want[name][field])
                assert all(torch.equal(got[name][field][k], t) for k, t in want[name][field].items()), (name, field)


def test_in_place_conversion_extends_the_manifest(saved, tmp_path):
    from megaclm.checkpoint.from_deepspeed import ensure_shards
    from megaclm.checkpoint.manifest import check_checksums, read_manifest

    ckpt = _default_save(saved, "zero2 dp2 fp32", tmp_path / "ckpt")
    before = read_manifest(os.path.join(ckpt, TAG))
    assert ensure_shards(ckpt, TAG) == ckpt
    after = read_manifest(os.path.join(ckpt, TAG))
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["megaclm/model/tp00_pp000.pt", "megaclm/optim/tp00_pp000.pt"]
    assert check_checksums(os.path.join(ckpt, TAG), list(after), after) is None
    assert not [n for n in os.listdir(os.path.join(ckpt, TAG, "megaclm")) if n.endswith(".tmp")]


@pytest.mark.parametrize("case", ["zero1 dp2 bf16", "zero2 dp2 fp32", "zero3 dp2 fp32"])
def test_deepspeed_zero_to_fp32_reads_the_checkpoint(saved, case, tmp_path):
    """The zero_to_fp32.py DeepSpeed copies into --save, run as its users run it, gives megaclm's fp32 weights."""
    ckpt = os.path.join(saved, case)
    r = subprocess.run([sys.executable, os.path.join(ckpt, "zero_to_fp32.py"), ckpt, str(tmp_path), "--tag", TAG],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    ours = torch.load(os.path.join(ckpt, TAG, "megaclm", "model", "tp00_pp000.pt"), weights_only=False)["tensors"]
    assert set(theirs) == set(ours)
    for key, tensor in ours.items():
        assert torch.equal(theirs[key].float(), tensor), key


def test_a_second_conversion_racing_the_first_keeps_its_files(saved, tmp_path):
    from megaclm.checkpoint.from_deepspeed import convert
    from megaclm.checkpoint.manifest import read_manifest

    ckpt = _default_save(saved, "zero1 dp2 fp32", tmp_path / "ckpt")
    convert(ckpt, TAG)
    first = {kind: _files(os.path.join(ckpt, TAG, "megaclm", kind)) for kind in ("model", "optim")}
    manifest = read_manifest(os.path.join(ckpt, TAG))
    convert(ckpt, TAG)  # finds both folders there: its own copy is dropped, nothing changes
    again = {kind: _files(os.path.join(ckpt, TAG, "megaclm", kind)) for kind in ("model", "optim")}
    assert read_manifest(os.path.join(ckpt, TAG)) == manifest
    for kind in first:
        for name, payload in first[kind].items():
            for field in ("tensors",) if kind == "model" else ("exp_avg", "exp_avg_sq"):
                assert all(torch.equal(t, again[kind][name][field][k]) for k, t in payload[field].items())
    assert sorted(os.listdir(os.path.join(ckpt, TAG, "megaclm"))) == ["config.json", "manifest.json", "meta.json",
                                                                       "model", "optim", "rng"]


def test_a_read_only_checkpoint_is_converted_into_a_temporary_copy(saved, tmp_path, monkeypatch):
    from megaclm.checkpoint import from_deepspeed
    from megaclm.checkpoint.shards import load_full_state_dict
    from megaclm.utils.errors import UserError

    ckpt = _default_save(saved, "zero2 dp2 bf16", tmp_path / "ckpt")
    monkeypatch.setattr(from_deepspeed.os, "access", lambda path, mode: False)  # as a read-only mount answers
    full = load_full_state_dict(ckpt, TAG)  # the offline readers: a temporary copy
    assert not os.path.isdir(os.path.join(ckpt, TAG, "megaclm", "model"))
    reference = load_full_state_dict(os.path.join(saved, "zero2 dp2 bf16"), TAG)
    assert all(torch.equal(full.state_dict[k], t) for k, t in reference.state_dict.items())
    with pytest.raises(UserError, match="must be converted to load into another layout, but .* is not writable; "
                                        "make it writable, or convert it with tools/checkpoint/reshard.py"):
        from_deepspeed.ensure_shards_collective(ckpt, TAG)  # a training run's load: ranks on other hosts read it


def test_a_checkpoint_that_does_not_record_its_parameters_is_refused(saved, tmp_path):
    from megaclm.checkpoint.from_deepspeed import PARAM_NAMES_KEY, convert
    from megaclm.utils.errors import UserError

    ckpt = _default_save(saved, "zero1 dp2 fp32", tmp_path / "ckpt")
    path = os.path.join(ckpt, TAG, "mp_rank_00_model_states.pt")
    states = torch.load(path, weights_only=False)
    del states[PARAM_NAMES_KEY]
    torch.save(states, path)
    with pytest.raises(UserError, match="does not record its parameters .* restore its megaclm/ folder"):
        convert(ckpt, TAG)
    assert not [n for n in os.listdir(os.path.join(ckpt, TAG, "megaclm")) if n.endswith(".tmp")]
    assert not os.path.isdir(os.path.join(ckpt, TAG, "megaclm", "model"))

