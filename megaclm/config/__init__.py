"""One typed, frozen config tree for megaclm, read from Megatron-style flags and/or a YAML file.

    cfg, derived = parse_config(["--num-layers", "4", "--hidden-size", "128", ...])
    cfg.model.hidden_size, cfg.training.global_batch_size, derived.grad_accum_steps

Sections (YAML key -> class, one file each in this package): model, parallel, kernels, data,
tokenizer, optimizer, scheduler, training, precision, zero, resilience, checkpoint, logging, lora.
A YAML file has the same tree (`{section: {field: value}}`, see examples/llama_7b.yaml); flags
override it; `--model-preset NAME` (or a top-level `model_preset:` key) starts the model section
from a named shape (megaclm.config.presets). Precedence: field defaults < preset < YAML < flags.

Each section validates itself in `__post_init__`; `validate.validate(cfg, derived)` does the
cross-section checks (all before any heavy work); `derived.compute_derived` gives the values that
depend on the world size. The config is never mutated: derived values live in `Derived`.

Tools that need only some sections (e.g. tools/build_data_indices.py: data, tokenizer, training)
call `parse_args(argv, sections=("data", "tokenizer", "training"), add_arguments=fn)`: only those
sections' flags exist, the others keep their defaults, cross-section checks that involve a missing
section are skipped, and `fn(parser)` may add the tool's own flags (returned in `.args`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

from megaclm.config import arguments, megatron_compat
from megaclm.config.checkpoint import CheckpointConfig
from megaclm.config.data import DataConfig
from megaclm.config.derived import Derived, compute_derived
from megaclm.config.kernels import KernelsConfig
from megaclm.config.logging import LoggingConfig
from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.config.optimizer import OptimizerConfig
from megaclm.config.parallel import ParallelConfig
from megaclm.config.precision import PrecisionConfig
from megaclm.config.presets import MODEL_PRESETS
from megaclm.config.resilience import ResilienceConfig
from megaclm.config.scheduler import SchedulerConfig
from megaclm.config.tokenizer import TokenizerConfig
from megaclm.config.training import TrainingConfig
from megaclm.config.zero import ZeroConfig
from megaclm.logging import get_logger
from megaclm.utils.errors import UserError

log = get_logger(__name__)


@dataclass(frozen=True)
class MegaclmConfig:
    """The whole run: one frozen section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: arguments.section_to_dict(getattr(self, s.name)) for s in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, tree: dict[str, dict[str, Any]]) -> "MegaclmConfig":
        """Rebuild from `to_dict()` output (e.g. the config stored in a checkpoint), type-checked."""
        values = arguments.yaml_values(tree, SECTIONS, source="stored config", note_moved=False)
        return cls(**arguments.build_sections(values, SECTIONS))


# YAML key -> section class, in the order of the tree.
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(MegaclmConfig)}


class ParsedArgs(NamedTuple):
    cfg: MegaclmConfig
    derived: Derived | None
    args: Any  # argparse.Namespace: meta flags (config, validate_only, world_size) and tool flags


def build_parser(sections: Iterable[str] | None = None, prog: str | None = None, description: str | None = None):
    chosen = _chosen_sections(sections)
    parser = arguments.build_parser(chosen, prog=prog, description=description)
    if "model" in chosen:
        parser.add_argument("--model-preset", dest="model_preset", default=None, choices=sorted(MODEL_PRESETS),
                            help="Start the model section from a named shape (flags and YAML override it).")
    return parser


def _chosen_sections(sections: Iterable[str] | None) -> dict[str, type]:
    if sections is None:
        return dict(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: {list(SECTIONS)}")
    return {s: SECTIONS[s] for s in SECTIONS if s in set(sections)}


def world_size_from_env(default: int | None = None) -> int:
    """WORLD_SIZE set by a launcher, else `default` (the --world-size preview flag), else 1.

    Both set and different is refused: the derived layout would not be the one that runs.
    """
    env = os.environ.get("WORLD_SIZE")
    if env and default is not None and int(env) != default:
        raise UserError(f"--world-size {default} disagrees with WORLD_SIZE={env} set by the launcher; "
                        "drop --world-size (it is for --validate-only previews outside a launcher)")
    return int(env) if env else (default or 1)


def parse_args(argv: list[str] | None = None, *, sections: Iterable[str] | None = None,
               add_arguments: Callable[[Any], None] | None = None, prog: str | None = None,
               description: str | None = None, world_size: int | None = None,
               stored_config: Callable[[str, int | None], dict | None] | None = None,
               overrides: dict[str, dict[str, Any]] | None = None) -> ParsedArgs:
    """Flags (+ optional --config YAML) -> validated config, derived values and the raw namespace.

    Megatron-LM / Megatron-DeepSpeed flags that are not megaclm's own are translated first
    (megaclm.config.megatron_compat; each ignored one is logged once, on rank 0). `stored_config(load_dir,
    ckpt_step)` reads the config tree of the checkpoint the run will load, for --use-checkpoint-args.
    `overrides` {section: {field: value}} win over the YAML and the flags (tools/check_layout.py replaces the
    data and tokenizer this way, before their files are checked).
    """
    from megaclm.config.validate import validate  # validate imports this module's siblings only

    chosen = _chosen_sections(sections)
    parser = build_parser(chosen, prog=prog, description=description)
    if add_arguments is not None:
        add_arguments(parser)
    argv, notes = megatron_compat.translate(sys.argv[1:] if argv is None else list(argv))
    ns = parser.parse_args(argv)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            log.info(note)
    tree = arguments.load_yaml(ns.config) if ns.config else {}
    preset = tree.pop("model_preset", None)
    preset = getattr(ns, "model_preset", None) or preset
    layers = []
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise UserError(f"model_preset {preset!r} is unknown; choose one of {', '.join(sorted(MODEL_PRESETS))}")
        layers.append({"model": dict(MODEL_PRESETS[preset])})
    yaml_layer = arguments.yaml_values(tree, chosen, source=f"--config {ns.config}")
    layers.append(arguments.propagate_shared(yaml_layer, parser.shared_dests))
    flags = arguments.flag_values(ns, chosen, parser.shared_dests)
    checkpoint = arguments.merge(*layers, flags).get("checkpoint", {})
    if checkpoint.get("use_checkpoint_args") and "model" in chosen:
        layers.append(_checkpoint_model_layer(checkpoint.get("load"), checkpoint.get("ckpt_step"),
                                              flags.get("model", {}), stored_config))
    layers.append(flags)
    layers.append(overrides or {})
    cfg = MegaclmConfig(**arguments.build_sections(arguments.merge(*layers), chosen))
    derived = None
    if {"training", "data"} <= set(chosen):
        derived = compute_derived(cfg, world_size or world_size_from_env(ns.world_size))
    validate(cfg, derived, sections=set(chosen))
    return ParsedArgs(cfg, derived, ns)


# Model fields that fix the checkpoint's parameter shapes: a flag may not change them (the weights would not
# load). Every other model flag overrides the stored value, as in Megatron-LM (`--max-position-embeddings`
# of a RoPE model, dropout, recomputation, RoPE scaling).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "swiglu", "add_bias_linear", "add_qkv_bias", "untie_embeddings_and_output_weights",
                 "normalization", "position_embedding_type")


def shape_fields(model: dict[str, Any]) -> tuple[str, ...]:
    """The fields of a model section (a dict) that fix its parameter shapes."""
    learned = model.get("position_embedding_type") == "learned_absolute"
    return SHAPE_FIELDS + (("max_position_embeddings",) if learned else ())


def _checkpoint_model_layer(load: str | None, ckpt_step: int | None, flags: dict[str, Any],
                            stored_config: Callable[[str, int | None], dict | None] | None) -> dict[str, dict[str, Any]]:
    """--use-checkpoint-args: the model section stored with the --load checkpoint, under the model flags given."""
    if load is None or stored_config is None:
        raise UserError("--use-checkpoint-args needs --load DIR (a megaclm checkpoint, or an HF import) to take "
                        "the model shape from")
    tree = stored_config(load, ckpt_step)
    if tree is None:
        raise UserError(f"--use-checkpoint-args: no checkpoint in --load {load} to take the model shape from; "
                        "pass the directory a run saved into (or an HF import), or give the model flags instead")
    stored = arguments.yaml_values({"model": tree.get("model", {})}, {"model": ModelConfig},
                                   source=f"the config stored in {load}")["model"]
    shape = shape_fields(stored)
    given = {k: v for k, v in flags.items() if k in stored and stored[k] != v}
    differ = [f"--{k.replace('_', '-')} {v!r} (checkpoint: {stored[k]!r})" for k, v in given.items() if k in shape]
    if differ:
        raise UserError(f"--use-checkpoint-args: these model flags change the parameter shapes of the checkpoint in "
                        f"{load}: {', '.join(differ)}; drop them or make them match")
    if given and os.environ.get("RANK", "0") == "0":
        log.info("--use-checkpoint-args: the flags override the checkpoint's " + ", ".join(
            f"{k}={stored[k]!r} -> {v!r}" for k, v in given.items()))
    return {"model": stored}


def parse_config(argv: list[str] | None = None, *, sections: Iterable[str] | None = None,
                 world_size: int | None = None) -> tuple[MegaclmConfig, Derived | None]:
    """`parse_args` without the namespace: (config, derived)."""
    cfg, derived, _ = parse_args(argv, sections=sections, world_size=world_size)
    return cfg, derived


__all__ = ["MegaclmConfig", "SECTIONS", "ParsedArgs", "Derived", "build_parser", "parse_args", "parse_config",
           "compute_derived", "world_size_from_env"]
