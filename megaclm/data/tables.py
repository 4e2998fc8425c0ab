"""Columnar inputs, read through pyarrow one record batch at a time (memory: about one batch):

    .parquet   row groups read lazily (ParquetFile.iter_batches)
    .arrow     Arrow IPC, the stream format Hugging Face `datasets` writes (the IPC file format too)
    a folder written by `datasets.Dataset.save_to_disk`: state.json lists its .arrow shards in order
    (with dataset_info.json beside them); a DatasetDict's folder (dataset_dict.json) holds one such
    folder per split.

`--json-keys` name columns. Rows are cut into slices of about `chunk_bytes` of text.
"""
import json
import os
from typing import Iterator

from megaclm.utils.errors import UserError


def hf_dataset_files(folder: str) -> list[str] | None:
    """The .arrow files of a `save_to_disk` folder in row order; None if `folder` is not one. A DatasetDict
    folder stands for its only split; with several, the user must name one."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = _read_json(folder, "dataset_dict.json").get("splits") or []
        if len(splits) != 1:
            raise UserError(f"--input {folder}: a Hugging Face DatasetDict with splits {splits}; name one split's "
                            f"folder, e.g. --input {os.path.join(folder, str((splits or ['train'])[0]))}")
        return hf_dataset_files(os.path.join(folder, splits[0])) or []
    if not os.path.isfile(os.path.join(folder, "state.json")):
        return None
    state = _read_json(folder, "state.json")
    try:
        files = [os.path.join(folder, entry["filename"]) for entry in state["_data_files"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder}/state.json: no '_data_files' list of {{'filename': ...}}; is this a folder "
                        "written by datasets' save_to_disk?") from e
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"{missing[0]}: listed in {folder}/state.json but missing; copy the whole folder again")
    return files


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)  # a few hundred bytes of metadata
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); is this a folder written by datasets' save_to_disk?") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: a JSON {type(obj).__name__}, expected an object")
    return obj


def table_rows(path: str, fmt: str, keys: list[str], chunk_bytes: int) -> Iterator[tuple[list[list], list[str], int]]:
    """(one list of values per key, where each row is, the slice's size in bytes), in row order."""
    import pyarrow as pa

    batches = _parquet_batches(path, keys, chunk_bytes) if fmt == "parquet" else _arrow_batches(path, keys)
    row = 1
    try:
        for batch in batches:
            batch = batch.select(keys)
            per_row = max(1, batch.nbytes // max(1, batch.num_rows))
            step = max(1, chunk_bytes // per_row)
            for start in range(0, batch.num_rows, step):
                part = batch.slice(start, step)
                n = part.num_rows
                yield [part.column(i).to_pylist() for i in range(len(keys))], [f"{path}:row {row + i}" for i in range(n)], n * per_row
                row += n
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read it past row {row - 1} ({e}); is the file truncated?") from e


def _check_columns(path: str, names: list[str], keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in names]
    if missing:
        raise UserError(f"{path}: column {missing[0]!r} not in the {what} schema {names}; check --json-keys")


def _parquet_batches(path: str, keys: list[str], chunk_bytes: int):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad file
        raise UserError(f"{path}: not a readable Parquet file ({e})") from e
    _check_columns(path, pf.schema_arrow.names, keys, "Parquet")
    # About chunk_bytes of text per batch for ~1 KB documents; row groups are read lazily.
    return pf.iter_batches(batch_size=max(1, chunk_bytes // 1024), columns=keys)


def _arrow_batches(path: str, keys: list[str]):
    import pyarrow as pa

    # Read, not memory-mapped: mapped pages would count in the resident memory as the file is read.
    with pa.OSFile(path) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise UserError(f"{path}: not an Arrow IPC file ({e}); .arrow inputs are Arrow IPC streams or "
                                "files as Hugging Face datasets and pyarrow write them") from e
        _check_columns(path, reader.schema.names, keys, "Arrow")
        if isinstance(reader, pa.ipc.RecordBatchStreamReader):
            yield from reader
        else:
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
