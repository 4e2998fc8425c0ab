"""Build every dataset index cache before launch, from the same flags as pretrain_gpt.py.

    python tools/build_data_indices.py <the pretrain_gpt.py flags, or --config run.yaml>

Give it the training command's flags unchanged (--data-path / --data-path-file / --train-data-path ...,
--split, --seq-length, --seed, --train-iters/--train-samples/--train-tokens/--train-epochs, --global-batch-size,
--eval-interval, --eval-iters, --data-cache-path, --data-mixing-schedule, the tokenizer flags; the
model flags are accepted and only validated). Without --global-batch-size the global batch is
micro batch x data-parallel size, with the world size from --world-size (or WORLD_SIZE).
The sample counts are computed as the trainer computes them, so the training run only loads.
Run it once per shared cache directory (or per node for node-local caches); concurrent runs are safe.
"""
import time

from megaclm.config import parse_args
from megaclm.config.derived import with_inputs
from megaclm.data.builder import build_train_valid_test, train_valid_test_num_samples
from megaclm.data.epochs import train_split
from megaclm.data.helpers import backend
from megaclm.tokenizer import build_tokenizer_from_config
from megaclm.training.spike import extra_train_batches
from megaclm.utils.errors import UserError, cli_main


def main(argv=None) -> int:
    cfg, derived, _ = parse_args(argv, prog="build_data_indices.py",
                                 description="Build the dataset index caches of a pretrain_gpt.py run.")
    if cfg.training.train_epochs is not None:  # the run length follows the data's size, as in pretrain_gpt.py
        derived = with_inputs(derived, cfg, samples_per_epoch=train_split(cfg.data).samples_per_epoch)
    if derived is None or derived.train_iters is None:
        raise UserError("the run length is unknown: pass --train-iters, --train-samples, --train-tokens or "
                        "--train-epochs")
    tokenizer = build_tokenizer_from_config(cfg.tokenizer, cfg.parallel.tensor_model_parallel_size)
    gbs = derived.global_batch_size
    samples = train_valid_test_num_samples(derived.train_iters, gbs, cfg.training.eval_interval,
                                           cfg.training.eval_iters)
    start = time.perf_counter()
    samples = (samples[0] + extra_train_batches(cfg.resilience) * gbs, *samples[1:])  # as build_batch_source
    datasets = build_train_valid_test(cfg.data, seed=cfg.training.seed, train_samples=samples[0],
                                      valid_samples=samples[1], test_samples=samples[2], eod_id=tokenizer.eod,
                                      global_batch_size=gbs)
    for name, wanted, ds in zip(("train", "valid", "test"), samples, datasets):
        print(f"{name}: {wanted} samples requested, {0 if ds is None else len(ds)} indexed")
    print(f"index caches ready in {time.perf_counter() - start:.1f} s (backend: {backend()})")
    return 0


if __name__ == "__main__":
    cli_main(main)
