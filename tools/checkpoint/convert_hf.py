"""Hugging Face <-> megaclm checkpoints.

    # continual pretraining straight from the HF directory (imported at start-up; a relaunch resumes)
    python tools/checkpoint/convert_hf.py config --hf ./Llama-3.2-1B --out llama1b.yaml
    deepspeed --num_gpus 2 pretrain_gpt.py --config llama1b.yaml --pretrained-checkpoint ./Llama-3.2-1B \\
        --save ckpt/llama1b-cpt --load ckpt/llama1b-cpt --data-path ... --train-iters ...

    # HF directory -> megaclm checkpoint for a TP x PP layout (then --pretrained-checkpoint ckpt/llama1b)
    python tools/checkpoint/convert_hf.py import --hf ./Llama-3.2-1B --out ckpt/llama1b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1

    # any megaclm checkpoint (any TP/PP layout) -> HF directory for transformers
    python tools/checkpoint/convert_hf.py export --load ckpt/llama1b-cpt --out ./llama1b-cpt-hf

    # a LoRA run's checkpoint (adapters + the base it names) -> merged HF model, or a PEFT adapter
    python tools/checkpoint/convert_hf.py export --load ckpt/lora-run --out ./merged-hf --lora-merge
    python tools/checkpoint/convert_hf.py export --load ckpt/llama1b --out ./base-hf
    python tools/checkpoint/convert_hf.py export --load ckpt/lora-run --out ./adapter --lora-adapter
    # PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("./base-hf"), "./adapter")

config writes the model and tokenizer sections of an HF directory as a --config YAML; import also writes
them, as OUT/model_config.yaml (model, tokenizer and parallel sections: pass it as --config) and
the HF tokenizer files under OUT/tokenizer. The vocabulary is padded Megatron's way (zero rows up to a
multiple of --make-vocab-size-divisible-by x TP) and the padding is dropped again on export.
Families: gpt2, llama (incl. Llama-3 RoPE scaling), mistral, qwen2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megaclm.logging.quiet import entry_point  # noqa: E402

entry_point()  # before DeepSpeed is imported: it would guess the accelerator, and warn that it did

from megaclm.checkpoint.hf import FAMILIES, infer_family, to_hf, vocab_rows  # noqa: E402
from megaclm.checkpoint.hf import files  # noqa: E402
from megaclm.checkpoint.hf.importer import import_hf, model_config_yaml  # noqa: E402
from megaclm.checkpoint.offline import check_fresh_output  # noqa: E402
from megaclm.checkpoint.hf.peft import to_peft  # noqa: E402
from megaclm.checkpoint.layout import read_meta, tag_at_step  # noqa: E402
from megaclm.checkpoint.shards import load_full_state_dict, load_lora_checkpoint, lora_trained_base  # noqa: E402
from megaclm.model.lora import merge_lora_state_dict  # noqa: E402
from megaclm.config import MegaclmConfig  # noqa: E402
from megaclm.config.checkpoint import BEST_STEP, parse_ckpt_step  # noqa: E402
from megaclm.logging import get_logger  # noqa: E402
from megaclm.utils.errors import UserError, cli_main  # noqa: E402

log = get_logger("megaclm.convert_hf")


LORA_EXPORTS = ("merge", "adapter")


def _check_lora_export(load: str, tag: str | None, lora: str | None) -> None:
    is_lora = "lora_base" in read_meta(load, tag)
    if lora not in (None, *LORA_EXPORTS):
        raise UserError(f"lora={lora!r} is not one of {', '.join(LORA_EXPORTS)}")
    if is_lora and lora is None:
        raise UserError(f"--load {load} holds LoRA adapters only; pass --lora-merge (an HF model with the adapters "
                        "folded in) or --lora-adapter (a PEFT adapter for the base exported on its own)")
    if lora is not None and not is_lora:
        raise UserError(f"--load {load} is a full checkpoint without LoRA adapters; drop --lora-{lora}")


def qlora_base(adapters, base) -> dict:
    """megaclm.checkpoint.shards.lora_trained_base, saying so for a QLoRA run."""
    method = adapters.config["lora"].get("base_quantization", "none")
    if method != "none":
        meta = adapters.meta
        log.info(f"QLoRA: merging into the base as the run saw it ({method}, tp {meta['tensor_model_parallel_size']}, "
                 f"{meta['precision']}), dequantized")
    return lora_trained_base(adapters, base)


def export_peft(adapters, base, out: str, family: str | None) -> dict:
    """The PEFT adapter directory of a LoRA checkpoint; returns adapter_config.json."""
    model_cfg = MegaclmConfig.from_dict({"model": base.config["model"]}).model
    family = family or base.meta.get("hf_model_type") or infer_family(model_cfg)
    config, tensors = to_peft(model_cfg, adapters.state_dict, family, adapters.config["lora"],
                              base_model=adapters.meta["lora_base"]["dir"])
    files.write_peft_dir(out, config, tensors)
    method = adapters.config["lora"].get("base_quantization", "none")
    if method != "none":
        log.info(f"QLoRA: these adapters were trained on the {method}-quantized base; on the unquantized one they "
                 "are off by its rounding (--lora-merge merges into the dequantized base instead)")
    log.info(f"exported the LoRA adapters of {adapters.meta['tag']} as a PEFT adapter ({family}) to {out}")
    return config


def export_hf(load: str, out: str, ckpt_step: int | str | None = None, family: str | None = None,
              tokenizer_dir: str | None = None, dtype: str = "fp32", vocab_size: int | None = None,
              max_shard_gb: float = 5.0, lora: str | None = None) -> dict:
    """megaclm checkpoint (any TP/PP) -> HF directory at `out`; returns the written config.json dict.

    A LoRA checkpoint needs `lora`: "merge" folds the adapters into the base weights of the checkpoint it
    names (W + alpha/r B A); "adapter" writes PEFT's adapter directory instead (returns adapter_config)."""
    check_fresh_output(out)
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise UserError(f"--tokenizer-dir {tokenizer_dir}: no such directory")
    tag = tag_at_step(load, ckpt_step)
    _check_lora_export(load, tag, lora)
    if lora is None:
        ckpt = load_full_state_dict(load, tag)
    else:
        adapters, ckpt = load_lora_checkpoint(load, tag)
        if lora == "adapter":
            return export_peft(adapters, ckpt, out, family)
        scale = adapters.config["lora"]["lora_alpha"] / adapters.config["lora"]["lora_rank"]
        base = qlora_base(adapters, ckpt)
        ckpt = ckpt._replace(state_dict=merge_lora_state_dict({**base, **adapters.state_dict}, scale))
    model_cfg = MegaclmConfig.from_dict({"model": ckpt.config["model"]}).model
    section = files.tokenizer_section(tokenizer_dir) if tokenizer_dir else ckpt.config.get("tokenizer", {})
    if tokenizer_dir and section is None:
        raise UserError(f"--tokenizer-dir {tokenizer_dir} has no tokenizer.json, vocab.json + merges.txt or "
                        "tokenizer.model")
    tok_files = files.tokenizer_sources(section)
    eod = files.build_from_section(section).eod
    vocab = vocab_size or max(ckpt.meta.get("tokenizer_vocab_size", 0), ckpt.meta.get("hf_vocab_size", 0)) \
        or vocab_rows(ckpt.state_dict)
    hf_config, hf_sd = to_hf(model_cfg, ckpt.state_dict, vocab, family or ckpt.meta.get("hf_model_type")
                             or infer_family(model_cfg))
    hf_config.update(files.token_ids(tok_files, eod))
    files.write_hf_dir(out, hf_config, hf_sd, tok_files, dtype, max_shard_gb)
    log.info(f"exported {os.path.join(load, ckpt.meta['tag'])} (tp {ckpt.meta['tensor_model_parallel_size']} x "
             f"pp {ckpt.meta['pipeline_model_parallel_size']}) as {hf_config['model_type']} to {out}")
    return hf_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory -> megaclm checkpoint")
    imp.add_argument("--hf", required=True, help="Local HF model directory (config.json, *.safetensors, tokenizer).")
    imp.add_argument("--out", required=True, help="New checkpoint directory (must not exist or be empty).")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    conf = sub.add_parser("config", help="HF directory -> the model and tokenizer sections as --config YAML")
    conf.add_argument("--hf", required=True, help="Local HF model directory (config.json, tokenizer files).")
    conf.add_argument("--out", required=True, help="YAML file to write (must not exist).")
    conf.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    exp = sub.add_parser("export", help="megaclm checkpoint -> HF directory")
    exp.add_argument("--load", required=True, help="megaclm checkpoint directory (pretrain_gpt.py --save, or import).")
    exp.add_argument("--out", required=True, help="New HF model directory (must not exist or be empty).")
    step = exp.add_mutually_exclusive_group()
    step.add_argument("--ckpt-step", type=parse_ckpt_step, default=None,
                      help="Export iteration N instead of `latest` (`best`: as --best).")
    step.add_argument("--best", dest="ckpt_step", action="store_const", const=BEST_STEP,
                      help="Export the checkpoint with the lowest validation loss (<load>/best, --save-best).")
    exp.add_argument("--family", choices=FAMILIES, default=None,
                     help="HF architecture to write; default: the imported one, else inferred from the model config.")
    exp.add_argument("--tokenizer-dir", default=None,
                     help="Copy the tokenizer from here instead of the one in the checkpoint's config.")
    exp.add_argument("--dtype", choices=sorted(files.DTYPES), default="fp32", help="dtype of the saved weights.")
    exp.add_argument("--max-shard-size-gb", type=float, default=5.0,
                     help="Split model.safetensors into shards of at most this size (+ an index file).")
    exp.add_argument("--vocab-size", type=int, default=None,
                     help="Rows of the embedding to keep; default: the tokenizer's (or the imported model's) size.")
    lora = exp.add_mutually_exclusive_group()
    lora.add_argument("--lora-merge", dest="lora", action="store_const", const="merge",
                      help="A LoRA checkpoint: write the HF model with the adapters folded into its base weights.")
    lora.add_argument("--lora-adapter", dest="lora", action="store_const", const="adapter",
                      help="A LoRA checkpoint: write only the adapters, as a PEFT adapter directory "
                           "(adapter_model.safetensors + adapter_config.json) for the base exported on its own.")
    a = p.parse_args()
    if a.command == "import":
        if a.tensor_model_parallel_size < 1 or a.pipeline_model_parallel_size < 1:
            raise UserError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        import_hf(a.hf, a.out, a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                  a.make_vocab_size_divisible_by)
        print(f"continue training with: pretrain_gpt.py --config {os.path.join(a.out, 'model_config.yaml')} "
              f"--pretrained-checkpoint {a.out} --save RUN --load RUN --data-path ... --train-iters ...")
    elif a.command == "config":
        check_fresh_output(a.out)
        text = model_config_yaml(a.hf, divisible_by=a.make_vocab_size_divisible_by)
        with open(a.out, "w") as f:
            f.write(text)
        print(f"continue training with: pretrain_gpt.py --config {a.out} --pretrained-checkpoint {a.hf} "
              "--save RUN --load RUN --data-path ... --train-iters ...")
    else:
        cfg = export_hf(a.load, a.out, a.ckpt_step, a.family, a.tokenizer_dir, a.dtype, a.vocab_size,
                        a.max_shard_size_gb, lora=a.lora)
        if a.lora == "adapter":
            print(json.dumps({"out": a.out, "peft_type": cfg["peft_type"], "target_modules": cfg["target_modules"]}))
        else:
            print(json.dumps({"out": a.out, "model_type": cfg["model_type"], "vocab_size": cfg["vocab_size"]}))


if __name__ == "__main__":
    cli_main(main)
