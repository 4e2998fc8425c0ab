"""The config tree: flags, YAML, precedence, did-you-mean, type errors, cross-section checks,
derived values, the DeepSpeed JSON and its consistency checks, and lr schedules vs closed forms."""
import dataclasses
import json
import math
import typing

import numpy as np
import pytest
import yaml

from megaclm.config import SECTIONS, MegaclmConfig, arguments, parse_args, parse_config
from megaclm.config.deepspeed_json import deepspeed_config, load_user_config
from megaclm.config.validate import check_vocab
from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.training.schedules import build_schedule
from megaclm.utils.errors import UserError

VOCAB, MERGES = "tests/data/gpt2-vocab.json", "tests/data/gpt2-merges.txt"


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("data") / "corpus_text_document")
    b = IndexedDatasetBuilder(p, np.uint16)
    for n in (50, 70, 90):
        b.add_document(np.arange(n) % 1000)
    b.finalize()
    return p


@pytest.fixture
def base(prefix):
    return ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", "100", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB,
            "--merge-file", MERGES, "--data-path", prefix]


def parse(argv, world_size=2):
    return parse_config(argv, world_size=world_size)


def write_yaml(tmp_path, tree, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


# ---- flags -------------------------------------------------------------------------------------------


def _fields_of(tp):
    """(section, field) of every flag-backed config field of type `tp` (optional or not)."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if arguments._strip_optional(hints[f.name])[0] is tp and f.metadata.get("cli", True):
                yield section, f


def test_every_boolean_flag_has_its_negation():
    """One generic check: each boolean flag and its `--no-` form (or Megatron's `--no-x` and its `--x`) set the
    field both ways, whatever the YAML said."""
    parser = arguments.build_parser(SECTIONS)
    fields = list(_fields_of(bool))
    assert {"checkpoint.finetune", "checkpoint.no_load_optim", "model.add_bias_linear",
            "logging.progress_bar"} <= {f"{s}.{f.name}" for s, f in fields}
    for section, f in fields:
        on = not f.metadata.get("invert", False)
        for flag in arguments.flag_names(f):
            for option, value in ((flag, on), (arguments.negation(flag), not on)):
                values = arguments.flag_values(parser.parse_args([option]), SECTIONS, parser.shared_dests)
                assert values[section][f.name] is value, option
    assert arguments.negation("--finetune") == "--no-finetune"
    assert arguments.negation("--no-load-optim") == "--load-optim"
    assert arguments.negation("--disable-bias-linear") == "--no-disable-bias-linear"


def test_a_negated_flag_overrides_the_yaml(base, tmp_path):
    yaml_path = write_yaml(tmp_path, {"checkpoint": {"load": str(tmp_path), "finetune": True, "no_load_optim": True}})
    cfg, _ = parse(base + ["--config", yaml_path, "--no-finetune", "--load-optim"])
    assert (cfg.checkpoint.finetune, cfg.checkpoint.no_load_optim) == (False, False)
    cfg, _ = parse(base + ["--disable-bias-linear", "--no-verify-checkpoint-checksums", "--no-progress-bar"])
    assert (cfg.model.add_bias_linear, cfg.checkpoint.verify_checkpoint_checksums, cfg.logging.progress_bar) == (
        False, False, False)
    cfg, _ = parse(base + ["--no-disable-bias-linear"])
    assert cfg.model.add_bias_linear is True



def test_megatron_flags_fill_every_section(base):
    cfg, d = parse(base + ["--bf16", "--zero-stage", "2", "--lr", "6e-4", "--lr-decay-style", "WSD",
                           "--disable-bias-linear", "--swiglu", "--normalization", "RMSNorm",
                           "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
                           "--position-embedding-type", "rope", "--save", "/tmp/x", "--log-interval", "5",
                           "--local_rank=1", "--deepspeed", "--deepspeed_config", "ds.json",
                           "--tensor-model-parallel-size", "2"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_query_groups) == (4, 128, 2)
    assert cfg.model.add_bias_linear is False and cfg.model.swiglu and cfg.model.normalization == "RMSNorm"
    assert cfg.model.untie_embeddings_and_output_weights and cfg.model.position_embedding_type == "rope"
    assert cfg.precision.bf16 and cfg.zero.zero_stage == 2 and cfg.training.deepspeed_config == "ds.json"
    assert cfg.optimizer.lr == 6e-4 and cfg.scheduler.lr_decay_style == "WSD"
    assert cfg.checkpoint.save == "/tmp/x" and cfg.logging.log_interval == 5
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.data.seq_length == 64
    assert d.data_parallel_size == 1 and d.grad_accum_steps == 4


def test_every_field_has_help_and_the_full_parser_builds():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
    text = arguments.build_parser(SECTIONS).format_help()
    assert "--num-attention-heads" in text and "--deepspeed_config" in text


def test_shared_flag_sets_model_and_tokenizer(base):
    cfg, _ = parse(base + ["--make-vocab-size-divisible-by", "64"])
    assert cfg.model.make_vocab_size_divisible_by == cfg.tokenizer.make_vocab_size_divisible_by == 64


def test_flag_type_error_names_the_path(base):
    with pytest.raises(UserError, match=r"model\.hidden_size expects an integer, got 'abc'"):
        parse(base + ["--hidden-size", "abc"])
    with pytest.raises(UserError, match="unrecognized arguments: --hiden-size"):
        parse(base + ["--hiden-size", "64"])


# ---- YAML --------------------------------------------------------------------------------------------


def test_yaml_tree_and_flags_override(tmp_path, base):
    path = write_yaml(tmp_path, {"model": {"hidden_size": 256, "num_layers": 2},
                                 "optimizer": {"lr": 1e-3, "weight_decay": 0.1}})
    cfg, _ = parse(base[4:] + ["--num-attention-heads", "4", "--config", path, "--num-layers", "6"])
    assert cfg.model.hidden_size == 256 and cfg.model.num_layers == 6  # flag beats YAML
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.1


def test_preset_then_yaml_then_flags(tmp_path, base):
    path = write_yaml(tmp_path, {"model_preset": "llama-7b", "model": {"num_layers": 3}})
    shape = {"--num-layers", "4", "--hidden-size", "128", "--num-attention-heads"}
    rest = base[6:]  # everything after the model shape flags
    assert not shape & set(rest[:1])
    cfg, _ = parse(["--config", path, "--hidden-size", "256", "--num-attention-heads", "4",
                    "--ffn-hidden-size", "512"] + rest)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.swiglu, m.normalization, m.add_bias_linear) == (3, 256, True, "RMSNorm", False)


def test_yaml_unknown_keys_get_did_you_mean(tmp_path, base):
    with pytest.raises(UserError, match=r"unknown key 'model.hiden_size'; did you mean 'hidden_size'\?"):
        parse(base + ["--config", write_yaml(tmp_path, {"model": {"hiden_size": 64}})])
    with pytest.raises(UserError, match=r"unknown section 'optimiser'; did you mean 'optimizer'\?"):
        parse(base + ["--config", write_yaml(tmp_path, {"optimiser": {"lr": 1.0}})])
    with pytest.raises(UserError, match=r"'lr' belongs under 'optimizer:'"):
        parse(base + ["--config", write_yaml(tmp_path, {"lr": 1.0})])


def test_yaml_type_errors_name_the_path(tmp_path, base):
    cases = [({"model": {"hidden_size": "big"}}, r"model\.hidden_size expects an integer, got 'big'"),
             ({"precision": {"bf16": "yes"}}, r"precision\.bf16 expects true or false"),
             ({"optimizer": {"lr": [1]}}, r"optimizer\.lr expects a number"),
             ({"data": {"data_path": "x"}}, r"data\.data_path expects a list"),
             ({"zero": {"zero_stage": 5}}, r"zero\.zero_stage=5 is not one of \[0, 1, 2, 3\]")]
    for tree, msg in cases:
        with pytest.raises(UserError, match=msg):
            parse(base + ["--config", write_yaml(tmp_path, tree)])
    with pytest.raises(UserError, match="no such file"):
        parse(base + ["--config", str(tmp_path / "missing.yaml")])


def test_kernels_op_backend_keeps_its_flag_and_former_yaml_key(tmp_path, base):
    cfg, _ = parse(base + ["--kernels", "compile"])
    assert cfg.kernels.op_backend == "compile"
    cfg, _ = parse(base + ["--config", write_yaml(tmp_path, {"kernels": {"kernels": "fused"}})])
    assert cfg.kernels.op_backend == "fused"  # a YAML file or a checkpoint's stored config of before the rename
    assert MegaclmConfig.from_dict({"kernels": {"kernels": "compile"}}).kernels.op_backend == "compile"
    cfg, _ = parse(base + ["--config", write_yaml(tmp_path, {"kernels": {"op_backend": "fused"}})])
    assert cfg.kernels.op_backend == "fused" and cfg.to_dict()["kernels"]["op_backend"] == "fused"
    with pytest.raises(UserError, match="kernels.kernels='cuda' is not one of"):
        parse(base + ["--config", write_yaml(tmp_path, {"kernels": {"kernels": "cuda"}})])

def test_yaml_and_stored_config_of_the_former_training_section_still_load(tmp_path, base, caplog):
    """precision, zero and resilience were part of `training:`; files written then load, with one deprecation line
    naming the new sections (none for a checkpoint's stored config, which the user does not edit)."""
    old = {"training": {"micro_batch_size": 2, "bf16": True, "zero_stage": 2, "spike_zscore": 4.0, "hang-timeout-s": 0}}
    new = {"training": {"micro_batch_size": 2}, "precision": {"bf16": True}, "zero": {"zero_stage": 2},
           "resilience": {"spike_zscore": 4.0, "hang_timeout_s": 0}}
    with caplog.at_level("WARNING", logger="megaclm.config.arguments"):
        cfg, _ = parse(base + ["--config", write_yaml(tmp_path, old)])
    assert cfg == parse(base + ["--config", write_yaml(tmp_path, new, "new.yaml")])[0]
    assert (cfg.precision.bf16, cfg.zero.zero_stage, cfg.resilience.spike_zscore) == (True, 2, 4.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "training.bf16 -> precision.bf16" in lines[0] and "training.zero_stage -> " \
        "zero.zero_stage" in lines[0] and "training.spike_zscore -> resilience.spike_zscore" in lines[0], lines
    caplog.clear()
    stored = {**cfg.to_dict(), "training": {**cfg.to_dict()["training"], "bf16": True, "zero_stage": 2}}
    del stored["precision"], stored["zero"]
    assert MegaclmConfig.from_dict(stored) == cfg and not caplog.records
    with pytest.raises(UserError, match="'bf16' is given under both 'training:' and 'precision:'; keep the "
                                        "'precision:' one"):
        parse(base + ["--config", write_yaml(tmp_path, {"training": {"bf16": True}, "precision": {"bf16": False}})])


def test_config_round_trips_through_yaml(tmp_path, base):
    cfg, _ = parse(base + ["--bf16", "--swiglu", "--lr", "2e-4"])
    path = tmp_path / "dump.yaml"
    path.write_text(arguments.dump_yaml(cfg.to_dict()))
    again, _ = parse(["--config", str(path)])
    assert again == cfg
    assert MegaclmConfig.from_dict(cfg.to_dict()) == cfg


def test_subset_of_sections_for_tools(prefix):
    got = parse_args(["--data-path", prefix, "--seq-length", "32", "--tokenizer-type", "NullTokenizer",
                      "--vocab-size", "1000", "--train-samples", "100", "--global-batch-size", "4", "--extra", "7"],
                     sections=("data", "tokenizer", "training"),
                     add_arguments=lambda p: p.add_argument("--extra", type=int))
    assert got.args.extra == 7 and got.derived.train_iters == 25 and got.cfg.data.seq_length == 32
    with pytest.raises(UserError, match="unrecognized arguments: --hidden-size"):
        parse_args(["--hidden-size", "8"], sections=("data", "tokenizer", "training"))


# ---- cross-section checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra, world, msg", [
    (["--tensor-model-parallel-size", "4", "--num-attention-heads", "6", "--hidden-size", "96"], 4,
     r"model\.num_attention_heads=6 is not divisible by parallel\.tensor_model_parallel_size=4"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], 4,
     r"pipeline_model_parallel_size=2 needs zero\.zero_stage 0 or 1, got 3"),
    (["--seq-length", "128"], 2, r"data\.seq_length=128 is larger than model\.max_position_embeddings=64"),
    (["--zero-stage", "3", "--torch-compile"], 2, r"kernels\.torch_compile with zero\.zero_stage=3"),
    (["--global-batch-size", "6"], 2,
     r"global_batch_size=6 is not divisible by training\.micro_batch_size=2 x data-parallel size 2"),
    (["--data-path"], 2, r"data\.data_path is empty"),
    (["--data-path", "/nonexistent/prefix"], 2, r"/nonexistent/prefix\.bin and /nonexistent/prefix\.idx not found"),
    (["--bf16", "--fp16"], 2, "exclusive"),
    (["--num-query-groups", "3"], 2, r"not divisible by model\.num_query_groups=3"),
    (["--lr-warmup-iters", "500"], 2, r"lr_warmup_iters=500 is longer than the decay length 100"),
    (["--lr-warmup-iters", "5", "--lr-decay-tokens", "1000"], 2, "mix iterations and tokens"),
    (["--vocab-file", "/nope.json"], 2, r"tokenizer\.vocab_file='/nope.json' does not exist"),
    (["--tensor-model-parallel-size", "2"], 3, r"world size 3 is not divisible by parallel.tensor_model_parallel_size=2"),
    (["--spike-zscore", "0"], 2, r"resilience\.spike_zscore=0\.0 must be > 0"),
    (["--spike-zscore", "3", "--spike-window", "1"], 2, r"resilience\.spike_window=1 must be >= 2"),
    (["--spike-zscore", "3", "--spike-action", "rollback"], 2, r"spike_action=rollback needs checkpoint\.save"),
    (["--spike-zscore", "3", "--pipeline-model-parallel-size", "2"], 2, r"needs parallel\.pipeline_model_parallel_size=1"),
    (["--hang-timeout-s=-1"], 2, r"resilience\.hang_timeout_s=-1\.0 must be >= 0 \(0 turns the watchdog off\)"),
    (["--async-save"], 2, r"async_save need checkpoint\.save"),
    (["--save-layout-independent-interval", "2"], 2, r"save_layout_independent_interval/async_save need checkpoint"),
    (["--save", "/tmp/x", "--save-layout-independent-interval", "0"], 2,
     r"checkpoint\.save_layout_independent_interval=0 must be >= 1 \(1: every save\)"),
    (["--profile", "--profile-ranks", "0", "2"], 2,
     r"logging\.profile_ranks=\[0, 2\]: rank 2 is not in a world of 2; give ranks 0-1 to --profile-ranks"),
    (["--profile", "--profile-step-start", "12", "--profile-step-end", "12"], 2, r"need 0 <= start < end"),
    (["--use-pytorch-profiler"], 2, r"logging\.use_pytorch_profiler chooses how --profile profiles; add --profile"),
])
def test_config_errors(base, extra, world, msg):
    with pytest.raises(UserError, match=msg):
        parse(base + extra, world_size=world)


def test_megatron_profile_flags_are_native(base):
    """Megatron-LM's --profile flags and defaults (steps after 10 up to 12, rank 0); megaclm's --profile-dir."""
    lg = parse(base)[0].logging
    assert (lg.profile, lg.use_pytorch_profiler, lg.profile_step_start, lg.profile_step_end, lg.profile_ranks,
            lg.profile_dir) == (False, False, 10, 12, [0], None)
    lg = parse(base + ["--profile", "--use-pytorch-profiler", "--profile-step-start", "3", "--profile-step-end", "5",
                       "--profile-ranks", "0", "1", "--profile-dir", "p"])[0].logging
    assert (lg.profile, lg.use_pytorch_profiler, lg.profile_step_start, lg.profile_step_end, lg.profile_ranks,
            lg.profile_dir) == (True, True, 3, 5, [0, 1], "p")


def test_hang_watchdog_is_on_by_default_and_0_turns_it_off(base):
    assert parse(base)[0].resilience.hang_timeout_s == 1800.0
    assert parse(base + ["--hang-timeout-s", "0"])[0].resilience.hang_timeout_s == 0.0


def test_every_float_field_refuses_inf_and_nan(base, tmp_path):
    """One generic check: no float of the config means anything as inf or nan (lr, betas, eps, std, timeouts)."""
    fields = list(_fields_of(float))
    assert {"optimizer.lr", "optimizer.min_lr", "optimizer.weight_decay", "optimizer.clip_grad", "optimizer.adam_beta1",
            "optimizer.adam_eps", "model.init_method_std"} <= {f"{s}.{f.name}" for s, f in fields}
    for section, f in fields:
        flag = arguments.flag_names(f)[0]
        for text in ("inf", "nan", "1e999"):
            with pytest.raises(UserError, match=rf"argument {flag}: {section}\.{f.name}=(inf|nan) is not a finite"):
                parse(base + [flag, text])
        for value in (float("-inf"), float("nan")):
            with pytest.raises(UserError, match=rf"^{section}\.{f.name}=-?(inf|nan) is not a finite number"):
                parse(base + ["--config", write_yaml(tmp_path, {section: {f.name: value}})])


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3e-4", 3e-4), ("1E5", 1e5), ("-2e-5", -2e-5), (".5", 0.5),
                                         ("6e+2", 600.0), ("1.0e5", 1e5), ("1_000", 1000), ('"1e-3"', "1e-3"),
                                         ("'6e+2'", "6e+2"), ("1e", "1e"), ("e5", "e5")])
def test_yaml_reads_yaml_1_2_floats(text, value):
    got = arguments.yaml_load(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)
    # and a string that looks like one is written quoted, so it reads back as a string
    assert arguments.yaml_load(arguments.dump_yaml({"x": str(value)}))["x"] == str(value)


def test_run_length_is_required(base):
    argv = [a for a in base if a not in ("--train-iters", "100")]
    with pytest.raises(UserError, match="--train-iters, --train-samples, --train-tokens or --train-epochs"):
        parse(argv)


def test_tokenizer_vocab_larger_than_model():
    check_vocab(50257, 50304, "ckpt")
    with pytest.raises(UserError, match=r"tokenizer's vocabulary \(50257 tokens\) is larger than the model's \(32000"):
        check_vocab(50257, 32000, "ckpt")


def test_derived_values(base):
    _, d = parse(base, world_size=4)
    assert (d.data_parallel_size, d.grad_accum_steps, d.tokens_per_step, d.train_iters) == (4, 1, 8 * 64, 100)
    argv = [a for a in base if a not in ("--train-iters", "100")]
    _, d = parse(argv + ["--train-samples", "81"], world_size=2)
    assert d.train_iters == 11 and d.grad_accum_steps == 2
    _, d = parse(argv + ["--train-tokens", str(8 * 64 * 10 + 1)])
    assert d.train_iters == 11
    _, d = parse(base + ["--tensor-model-parallel-size", "2"], world_size=4)
    assert d.data_parallel_size == 2 and d.grad_accum_steps == 2



def test_the_run_completes_parse_args_derived_without_a_second_derivation(base, monkeypatch):
    """pretrain.derive adds the vocabulary and the --train-tokens step under a warmup to parse_args's Derived;
    compute_derived (the layout checks) runs once, in parse_args."""
    import megaclm.config
    from megaclm.config import derived as derived_module
    from megaclm.training import pretrain

    argv = [a for a in base if a not in ("--train-iters", "100")] + ["--train-iters", "30",
                                                                     "--train-tokens", str(8 * 64 * 10 + 1)]
    cfg, d = parse(argv)
    assert (d.train_iters, d.padded_vocab_size) == (11, None)
    for module in (megaclm.config, derived_module):  # any second derivation would fail here
        monkeypatch.setattr(module, "compute_derived", None)
    full = pretrain.derive(cfg, d, 50257)
    # 50 + 70 + 90 tokens: 3 samples of 64 per epoch (logged; the length is --train-tokens)
    assert full == dataclasses.replace(d, vocab_size=50257, padded_vocab_size=50304, samples_per_epoch=3)
    assert (derived_module.with_inputs(d, cfg, tokens_iters=40).train_iters,  # --train-iters 30 stops first
            derived_module.with_inputs(d, cfg, tokens_iters=7).train_samples) == (30, 7 * 8)

# ---- DeepSpeed JSON ----------------------------------------------------------------------------------


def test_generated_deepspeed_json(base):
    cfg, d = parse(base + ["--fp16", "--zero-stage", "3", "--clip-grad", "0.5", "--offload-optimizer",
                           "--zero-param-persistence-threshold", "0"])
    ds = deepspeed_config(cfg, d, cuda=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["optimizer"]["params"]["torch_adam"] is True and "torch_adam" not in ds["optimizer"]
    assert "torch_adam" not in deepspeed_config(cfg, d, cuda=True)["optimizer"]["params"]
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1.0}
    assert ds["bf16"] == {"enabled": False, "check_grad_overflow": True} and ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0 and z["offload_optimizer"]["device"] == "cpu"
    assert "scheduler" not in ds and "reduce_scatter" not in z


@pytest.mark.parametrize("flag", ["--ds-sequence-parallel-size", "--context-parallel-size"])
def test_sequence_split_derives_dp_and_takes_zero3_all_reduce_path(base, flag):
    cfg, d = parse(base + [flag, "2", "--zero-stage", "3", "--attention-dropout", "0"], world_size=4)
    assert (d.seq_split_size, d.data_parallel_size, d.grad_accum_steps) == (2, 2, 2)
    assert deepspeed_config(cfg, d, cuda=False)["zero_optimization"]["reduce_scatter"] is False


@pytest.mark.parametrize("user, msg", [
    ({"train_batch_size": 16}, r"train_batch_size=16 contradicts --global-batch-size \(= 8\)"),
    ({"train_micro_batch_size_per_gpu": 4}, "contradicts --micro-batch-size"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps=1 contradicts"),
    ({"gradient_clipping": 0.3}, r"gradient_clipping=0.3 contradicts --clip-grad \(= 1.0\)"),
    ({"bf16": {"enabled": True}}, r"bf16\.enabled=true enables bf16 but --bf16 is not given"),
    ({"zero_optimization": {"stage": 2}}, "contradicts --zero-stage"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' block is not supported"),
])
def test_user_deepspeed_json_must_agree(tmp_path, base, user, msg):
    cfg, d = parse(base)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(UserError, match=msg):
        load_user_config(str(path), deepspeed_config(cfg, d, cuda=False))


def test_user_deepspeed_json_is_merged(tmp_path, base):
    cfg, d = parse(base)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": 1.0,
                                "optimizer": {"params": {"eps": 1e-6}}, "zero_optimization": {"overlap_comm": True}}))
    merged = load_user_config(str(path), deepspeed_config(cfg, d, cuda=False))
    assert merged["train_batch_size"] == 8 and merged["optimizer"]["params"]["eps"] == 1e-6
    assert merged["optimizer"]["params"]["torch_adam"] is True and merged["zero_optimization"]["overlap_comm"]
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_user_config(str(path), {})


# ---- schedules vs closed forms -----------------------------------------------------------------------


def sched(base, extra, **kw):
    cfg, d = parse(base + ["--lr", "1.0", "--min-lr", "0.1"] + extra)
    return build_schedule(cfg.optimizer, cfg.scheduler, d.train_iters, d.tokens_per_step, cfg.training.train_tokens,
                          d.global_batch_size)


def test_schedules_match_closed_forms(base):
    s = sched(base, ["--lr-decay-style", "cosine", "--lr-warmup-iters", "10"])
    assert s.lr(0, 0) == 0.0 and s.lr(5, 0) == pytest.approx(0.5) and s.lr(10, 0) == pytest.approx(1.0)
    assert s.lr(55, 0) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    r = (80 - 10) / 90
    assert s.lr(80, 0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * r)))
    assert s.lr(100, 0) == pytest.approx(0.1) and s.lr(150, 0) == pytest.approx(0.1)
    s = sched(base, ["--lr-decay-style", "linear", "--lr-warmup-iters", "10", "--lr-decay-iters", "60"])
    assert s.lr(35, 0) == pytest.approx(0.1 + 0.9 * 0.5) and s.lr(61, 0) == pytest.approx(0.1)
    s = sched(base, ["--lr-decay-style", "constant", "--lr-warmup-iters", "4"])
    assert s.lr(2, 0) == pytest.approx(0.5) and s.lr(99, 0) == 1.0
    s = sched(base, ["--lr-decay-style", "inverse-square-root", "--lr-warmup-iters", "4"])
    assert s.lr(16, 0) == pytest.approx(math.sqrt(4) / math.sqrt(16)) and s.lr(10000, 0) == pytest.approx(0.1)


def test_sample_lengths_are_iterations_of_the_global_batch(base):
    """--lr-warmup-samples / --lr-decay-samples (Megatron-LM's Llama-3 recipe) = iterations x global batch (8)."""
    by_samples = sched(base, ["--lr-warmup-samples", "80", "--lr-decay-samples", "480"])
    by_iters = sched(base, ["--lr-warmup-iters", "10", "--lr-decay-iters", "60"])
    assert [by_samples.lr(i, 0) for i in range(0, 80, 3)] == pytest.approx([by_iters.lr(i, 0) for i in range(0, 80, 3)])
    with pytest.raises(UserError, match="mix iterations and tokens"):
        sched(base, ["--lr-warmup-samples", "80", "--lr-decay-tokens", "4000"])


def test_decoupled_lr_shapes_the_same_schedule_between_its_own_bounds(base):
    s = sched(base, ["--lr-warmup-iters", "10", "--decoupled-lr", "5.0", "--decoupled-min-lr", "0.5"])
    for it in (0, 5, 10, 40, 100, 150):
        # lr = min + (max - min) * c(it) with the same c for both
        c = (s.lr(it, 0) - 0.1) / 0.9 if it >= 10 else s.lr(it, 0)
        want = 0.5 + 4.5 * c if it >= 10 else 5.0 * c
        assert s.decoupled_lr(it, 0) == pytest.approx(want)
    assert sched(base, []).decoupled_lr(40, 0) == sched(base, []).lr(40, 0)
    with pytest.raises(UserError, match="decoupled_min_lr needs optimizer.decoupled_lr"):
        parse(base + ["--decoupled-min-lr", "0.1"])


@pytest.mark.parametrize("style, coeff", [
    ("linear", lambda q: 1 - q), ("cosine", lambda q: 0.5 * (1 + math.cos(math.pi * q))),
    ("minus_sqrt", lambda q: 1 - math.sqrt(q)), ("exponential", lambda q: 2 * 0.5 ** q - 1)])
def test_wsd_schedules(base, style, coeff):
    s = sched(base, ["--lr-decay-style", "WSD", "--lr-warmup-iters", "10", "--lr-wsd-decay-style", style,
                     "--lr-wsd-decay-iters", "20"])
    assert s.lr(50, 0) == 1.0 and s.lr(80, 0) == 1.0
    for it in (85, 90, 99):
        q = (it - 80) / 20
        assert s.lr(it, 0) == pytest.approx(0.1 + 0.9 * coeff(q))


def test_schedule_by_tokens_and_warmup_fraction(base):
    s = sched(base, ["--lr-decay-style", "linear", "--lr-warmup-tokens", "1000", "--lr-decay-tokens", "11000"])
    assert s.unit == "tokens"
    assert s.lr(999, 500) == pytest.approx(0.5) and s.lr(0, 6000) == pytest.approx(0.1 + 0.9 * 0.5)
    s = sched(base, ["--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1"])
    assert s.warmup == 10 and s.lr(5, 0) == pytest.approx(0.5)


def test_world_size_flag_must_agree_with_the_launcher(monkeypatch):
    from megaclm.config import world_size_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size_from_env(None) == 1 and world_size_from_env(8) == 8
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from_env(None) == 4 and world_size_from_env(4) == 4
    with pytest.raises(UserError, match="--world-size 8 disagrees with WORLD_SIZE=4"):
        world_size_from_env(8)
