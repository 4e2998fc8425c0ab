"""An HF model directory -> a megaclm checkpoint for a TP x PP layout (tools/checkpoint/convert_hf.py import, and
`pretrain_gpt.py --pretrained-checkpoint HF_DIR`, which imports into a temporary directory at start-up).

The vocabulary is padded Megatron's way (zero rows up to a multiple of `divisible_by` x TP); the checkpoint keeps
its own copy of the tokenizer files (OUT/tokenizer) and OUT/model_config.yaml, the model, tokenizer and parallel
sections to pass to pretrain_gpt.py as --config (`model_config_yaml` gives the same text without any weights).
"""
from __future__ import annotations

import dataclasses
import os

from megaclm.checkpoint.hf import config_from_hf, from_hf, hf_family, pad_vocab, vocab_rows
from megaclm.checkpoint.hf import files
from megaclm.checkpoint.offline import check_fresh_output, write_checkpoint
from megaclm.config import MegaclmConfig
from megaclm.config.arguments import dump_yaml
from megaclm.config.derived import pad_vocab_size
from megaclm.config.parallel import ParallelConfig
from megaclm.config.tokenizer import TokenizerConfig
from megaclm.config.validate import validate_layout
from megaclm.logging import get_logger
from megaclm.utils.errors import UserError

log = get_logger("megaclm.convert_hf")


def _config(hf_dir: str, tp: int, pp: int, divisible_by: int, tokenizer_root: str | None) -> MegaclmConfig:
    """The run config an HF directory describes (cheap: config.json and the tokenizer files' names only)."""
    model_cfg = dataclasses.replace(config_from_hf(files.read_config(hf_dir)), make_vocab_size_divisible_by=divisible_by)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    validate_layout(model_cfg, parallel)
    section = files.tokenizer_section(hf_dir, root=tokenizer_root)
    tokenizer = TokenizerConfig(**section, make_vocab_size_divisible_by=divisible_by) if section else \
        TokenizerConfig(make_vocab_size_divisible_by=divisible_by)
    return MegaclmConfig(model=model_cfg, parallel=parallel, tokenizer=tokenizer)


def model_config_yaml(hf_dir: str, tp: int = 1, pp: int = 1, divisible_by: int = 128,
                      tokenizer_root: str | None = None) -> str:
    """The model, tokenizer and parallel sections for an HF directory, as `--config` YAML text."""
    tree = _config(hf_dir, tp, pp, divisible_by, tokenizer_root).to_dict()
    family = hf_family(files.read_config(hf_dir))
    return (f"# written by convert_hf.py from {os.path.abspath(hf_dir)} ({family}); pass as pretrain_gpt.py --config\n"
            + dump_yaml({k: tree[k] for k in ("model", "tokenizer", "parallel")}))


def import_hf(hf_dir: str, out: str, tp: int = 1, pp: int = 1, divisible_by: int = 128) -> str:
    """HF directory -> megaclm checkpoint at `out`; returns the tag. Checks cheap things before reading weights."""
    hf_config = files.read_config(hf_dir)
    family = hf_family(hf_config)
    check_fresh_output(out)
    tok_section = files.tokenizer_section(hf_dir)
    root = os.path.join(os.path.abspath(out), "tokenizer") if tok_section else None
    cfg = _config(hf_dir, tp, pp, divisible_by, root)
    tokenizer = files.build_from_section(tok_section) if tok_section else None
    _, sd = from_hf(files.read_weights(hf_dir), hf_config)
    hf_vocab = vocab_rows(sd)
    tok_vocab = tokenizer.vocab_size if tokenizer else hf_vocab
    if tok_vocab > hf_vocab:
        raise UserError(f"the tokenizer in {hf_dir} has {tok_vocab} tokens but the model's embedding only {hf_vocab}; "
                        "the directory's tokenizer does not belong to its weights")
    padded = pad_vocab_size(hf_vocab, divisible_by, tp)
    extra = {}
    if tok_section:  # the checkpoint keeps its own copy: the HF directory may be gone when it is exported
        extra = {os.path.join("tokenizer", name): os.path.join(hf_dir, name) for name in files.TOKENIZER_FILES
                 if os.path.isfile(os.path.join(hf_dir, name))}
    else:
        log.warning(f"{hf_dir} has no tokenizer files; pass the tokenizer flags to pretrain_gpt.py yourself")
    meta = {"tokenizer_vocab_size": tok_vocab, "hf_vocab_size": hf_vocab, "hf_model_type": family,
            "consumed_samples": 0, "consumed_tokens": 0}
    yaml_text = model_config_yaml(hf_dir, tp, pp, divisible_by, root)
    tag = write_checkpoint(out, cfg.to_dict(), pad_vocab(sd, padded), tp=tp, pp=pp, meta=meta, extra_files=extra,
                           extra_texts={"model_config.yaml": yaml_text})
    n_params = sum(v.numel() for v in sd.values())
    log.info(f"imported {family} ({n_params:,} parameters, vocab {hf_vocab} padded to {padded}) from {hf_dir} "
             f"into {out} as tp {tp} x pp {pp}")
    return tag
