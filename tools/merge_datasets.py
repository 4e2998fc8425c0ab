"""Concatenate MMIDIDX datasets into one, in the order given.

    python tools/merge_datasets.py --input data/part_a data/part_b --output-prefix data/all
    python tools/merge_datasets.py --input data/parts/ --output-prefix data/all   # every .idx/.bin pair, sorted

Every input must hold the same token dtype (the same tokenizer); the output appears atomically.
"""
import argparse
import os

import numpy as np

from megaclm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, index_file_path
from megaclm.utils.errors import UserError, cli_main


def input_prefixes(inputs: list[str]) -> list[str]:
    """Prefixes named by `inputs`: a prefix (or its .bin/.idx path), or a directory of pairs."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f[:-4]) for f in os.listdir(item) if f.endswith(".idx"))
            if not found:
                raise UserError(f"--input {item}: directory holds no .idx/.bin dataset")
            prefixes.extend(found)
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    return prefixes


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    datasets = [IndexedDataset(p) for p in prefixes]  # every input opens (and validates) first
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise UserError(f"--output-prefix {output_prefix} is also an input; choose a new prefix")
    dtypes = {np.dtype(d.dtype).name for d in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{p} ({np.dtype(d.dtype).name})" for p, d in zip(prefixes, datasets))
        raise UserError(f"cannot merge datasets of different token dtypes: {listing}; "
                        "preprocess them all with the same tokenizer")
    with IndexedDatasetBuilder(output_prefix, datasets[0].dtype) as builder:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize()
    return IndexedDataset(output_prefix)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="Dataset prefixes (or .bin/.idx paths), or directories: all pairs inside, sorted by name.")
    p.add_argument("--output-prefix", required=True, help="Writes {prefix}.bin and {prefix}.idx.")
    args = p.parse_args(argv)
    prefixes = input_prefixes(args.input)
    merged = merge(prefixes, args.output_prefix)
    print(f"{index_file_path(args.output_prefix)}: {len(prefixes)} datasets, {len(merged.document_indices) - 1} "
          f"documents, {merged.num_tokens()} tokens ({np.dtype(merged.dtype).name})")
    return 0


if __name__ == "__main__":
    cli_main(main)
