"""Streaming document readers for preprocessing: files in, bounded chunks of documents out.

Formats (by suffix, after an optional `.gz` / `.zst` compression suffix):
    .jsonl / .json   one JSON object per line; `keys` name the text fields (a bare .gz/.zst is JSON lines)
    .txt             the whole file is one document, given to the first key
    .csv             header row, then one document per row; `keys` name columns
    .parquet         one document per row; `keys` name columns (read one row group batch at a time)

The main process only cuts inputs into chunks (`iter_chunks`): JSON lines travel as raw bytes
cut at line ends, so decoding, JSON parsing and validation (`parse_chunk`) run in the workers.
Every problem names the file and the line (or row) and says what to do.
"""
import csv
import glob
import gzip
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Iterator

from megaclm.utils.errors import UserError

FORMATS = (".jsonl", ".json", ".txt", ".csv", ".parquet")
COMPRESSIONS = (".gz", ".zst")
_BOM = b"\xef\xbb\xbf"


def file_format(path: str) -> tuple[str, str | None]:
    """(format, compression) of `path`, e.g. ("jsonl", "gz") for x.jsonl.gz; UserError if unknown."""
    name = path.lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if comp:
        name = name[: -len(comp)]
    fmt = next((f for f in FORMATS if name.endswith(f)), None)
    if fmt is None and comp:
        fmt = ".jsonl"  # data.gz / data.zst: compressed JSON lines, the common case
    if fmt is None or (fmt == ".parquet" and comp):
        raise UserError(
            f"--input {path}: unsupported file type; use .jsonl/.json (optionally .gz/.zst), .txt, .csv or .parquet"
        )
    return ("jsonl" if fmt == ".json" else fmt[1:]), comp and comp[1:]


def _supported(path: str) -> bool:
    try:
        file_format(path)
        return True
    except UserError:
        return False


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by `inputs` (files, globs, directories searched recursively), sorted per entry."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(d, f) for d, _, names in os.walk(item) for f in names if _supported(os.path.join(d, f))
            )
            if not found:
                raise UserError(f"--input {item}: directory holds no .jsonl/.json/.gz/.zst/.txt/.csv/.parquet file")
        elif any(c in item for c in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and _supported(p))
            if not found:
                raise UserError(f"--input {item}: the pattern matches no supported input file")
        elif os.path.isfile(item):
            file_format(item)
            found = [item]
        else:
            raise UserError(f"--input {item}: no such file, directory or glob match")
        files.extend(found)
    return files


@dataclass
class Chunk:
    """A slice of one input file, small enough to ship to a worker.

    kind "jsonl": `data` is raw bytes of whole lines, the first being line `first`.
    kind "text":  `data` is the raw bytes of a whole .txt file (one document).
    kind "rows":  `rows[k]` are the values of column `keys[k]`; `where[i]` locates row i.
    """

    path: str
    kind: str
    first: int = 1
    data: bytes = b""
    rows: list[list] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.kind != "rows" else sum(len(v) for col in self.rows for v in col if isinstance(v, str))


def _open_binary(path: str, comp: str | None) -> IO[bytes]:
    if comp == "gz":
        return gzip.open(path, "rb")
    if comp == "zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_chunks(path: str, f: IO[bytes], chunk_bytes: int) -> Iterator[Chunk]:
    line, carry = 1, b""
    first_block = True
    while block := f.read(chunk_bytes):
        if first_block and block.startswith(_BOM):
            block = block[len(_BOM):]
        first_block = False
        buf = carry + block
        cut = buf.rfind(b"\n") + 1
        if cut == 0:  # one line longer than a block: keep reading until it ends
            carry = buf
            continue
        carry = buf[cut:]
        yield Chunk(path, "jsonl", first=line, data=buf[:cut])
        line += buf.count(b"\n", 0, cut)
    if carry:
        yield Chunk(path, "jsonl", first=line, data=carry)


def _csv_chunks(path: str, f: IO[bytes], keys: list[str], chunk_bytes: int) -> Iterator[Chunk]:
    # A document may exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None:
            return
        missing = [k for k in keys if k not in header]
        if missing:
            raise UserError(f"{path}:1: column {missing[0]!r} not in the header {header}; check --json-keys")
        cols = [header.index(k) for k in keys]
        rows: list[list] = [[] for _ in keys]
        where: list[str] = []
        size = 0
        for record in reader:
            if not record:
                continue
            where.append(f"{path}:{reader.line_num}")
            for c, col in zip(cols, rows):
                col.append(record[c] if c < len(record) else None)
                size += len(col[-1] or "")
            if size >= chunk_bytes:
                yield Chunk(path, "rows", rows=rows, where=where)
                rows, where, size = [[] for _ in keys], [], 0
        if where:
            yield Chunk(path, "rows", rows=rows, where=where)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{reader.line_num + 1}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from e
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e


def _parquet_chunks(path: str, keys: list[str], chunk_bytes: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad file
        raise UserError(f"{path}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    missing = [k for k in keys if k not in names]
    if missing:
        raise UserError(f"{path}: column {missing[0]!r} not in the Parquet schema {names}; check --json-keys")
    row = 1
    # About chunk_bytes of text per batch, assuming ~1 KB documents; row groups are read lazily.
    for batch in pf.iter_batches(batch_size=max(1, chunk_bytes // 1024), columns=keys):
        n = batch.num_rows
        yield Chunk(path, "rows", rows=[batch.column(k).to_pylist() for k in keys],
                    where=[f"{path}:row {row + i}" for i in range(n)])
        row += n


def iter_chunks(path: str, keys: list[str], chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Chunks of `path` in file order; memory stays about `chunk_bytes` whatever the file size."""
    fmt, comp = file_format(path)
    if fmt == "parquet":
        yield from _parquet_chunks(path, keys, chunk_bytes)
        return
    try:
        with _open_binary(path, comp) as f:
            if fmt == "jsonl":
                yield from _jsonl_chunks(path, f, chunk_bytes)
            elif fmt == "csv":
                yield from _csv_chunks(path, f, keys, chunk_bytes)
            else:
                data = f.read()
                yield Chunk(path, "text", data=data[len(_BOM):] if data.startswith(_BOM) else data)
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError | PermissionError):
            raise UserError(f"--input {path}: cannot open it ({e.strerror})") from e
        raise UserError(f"{path}: cannot read it ({e}); is the file truncated or not really {comp or fmt}?") from e
    except Exception as e:
        if comp == "zst" and type(e).__name__ == "ZstdError":  # a corrupt frame
            raise UserError(f"{path}: corrupt zstd data ({e})") from e
        raise


def _decode(data: bytes, path: str, first: int, hint: str = " or pass --skip-bad-lines") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first + data.count(b"\n", 0, e.start)
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); convert the file to UTF-8{hint}"
        ) from e


def _decode_or_none(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_chunk(chunk: Chunk, keys: list[str], skip_bad_lines: bool) -> tuple[list[list[str]], int]:
    """The documents of a chunk, one list of texts per key, and the number of bad lines skipped.

    A bad line (malformed JSON, not an object, missing key, value not a string, bad UTF-8) raises
    UserError naming file and line, or is skipped for every key when `skip_bad_lines`.
    """
    if chunk.kind == "text":
        return [[_decode(chunk.data, chunk.path, 1, hint="")]], 0  # a whole document: nothing to skip
    texts: list[list[str]] = [[] for _ in keys]
    bad = 0
    if chunk.kind == "rows":
        for i, where in enumerate(chunk.where):
            values = [col[i] for col in chunk.rows]
            err = next((k for k, v in zip(keys, values) if not isinstance(v, str)), None)
            if err is not None:
                if skip_bad_lines:
                    bad += 1
                    continue
                v = values[keys.index(err)]
                raise UserError(f"{where}: column {err!r} is {type(v).__name__}, expected a string; "
                                "fix the row or pass --skip-bad-lines")
            for col, v in zip(texts, values):
                col.append(v)
        return texts, bad
    try:
        lines: list[str | None] = chunk.data.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # rare: find the bad lines one by one, in order with other errors
        lines = [_decode_or_none(raw) for raw in chunk.data.split(b"\n")]
    for i, line in enumerate(lines):
        if line is None:
            if skip_bad_lines:
                bad += 1
                continue
            _decode(chunk.data.split(b"\n")[i], chunk.path, chunk.first + i)  # raises, naming line and column
        if not line.strip():
            continue  # blank lines separate nothing and are not documents
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, expected an object")
            for k in keys:
                if k not in obj:
                    raise KeyError(k)
                if not isinstance(obj[k], str):
                    raise TypeError(k, type(obj[k]).__name__)
        except (ValueError, KeyError, TypeError) as e:
            if skip_bad_lines:
                bad += 1
                continue
            where = f"{chunk.path}:{chunk.first + i}"
            if isinstance(e, KeyError):
                msg = f"key {e.args[0]!r} missing (the object has keys {sorted(obj)[:8]}); check --json-keys"
            elif isinstance(e, TypeError):
                msg = f"key {e.args[0]!r} is a {e.args[1]}, expected a string"
            elif isinstance(e, json.JSONDecodeError):
                msg = f"malformed JSON ({e.msg} at column {e.colno})"
            else:
                msg = str(e)
            raise UserError(f"{where}: {msg}; fix the line or pass --skip-bad-lines") from e
        for col, k in zip(texts, keys):
            col.append(obj[k])
    return texts, bad
