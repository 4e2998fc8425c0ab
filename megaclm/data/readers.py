"""Streaming document readers for preprocessing: files in, bounded chunks of documents out.

Formats (by suffix, after an optional `.gz` / `.zst` compression suffix):
    .jsonl           one JSON object per line; `keys` name the text fields (a bare .gz/.zst is JSON lines)
    .json            the same, or one JSON array of objects (the file starts with '['; json_array.py)
    .txt             by `text_mode`: "file" the whole file is one document, "line" each non-blank line,
                     "paragraph" each run of non-blank lines (blank lines separate); for the first key
    .csv             header row, then one document per row; `keys` name columns
    .parquet, .arrow one document per row; `keys` name columns (tables.py: one record batch at a time)
    a folder written by Hugging Face datasets' save_to_disk: its .arrow files (tables.py)

The main process only cuts inputs into chunks (`iter_chunks`): JSON lines and text travel as raw
bytes cut at line ends (paragraphs: at blank lines), so decoding, JSON parsing and validation
(`parse_chunk`) run in the workers; JSON arrays are cut into elements by the main process.
Every problem names the file and the line (or row) and says what to do.
"""
import csv
import glob
import gzip
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import IO, Iterator

from megaclm.data.json_array import is_json_array, iter_array
from megaclm.data.tables import hf_dataset_files, table_rows
from megaclm.utils.errors import UserError

FORMATS = (".jsonl", ".json", ".txt", ".csv", ".parquet", ".arrow")
COMPRESSIONS = (".gz", ".zst")
TEXT_MODES = ("file", "line", "paragraph")
TEXT_MODE_HELP = ("How a .txt input splits into documents: file (the whole file is one document; default), line "
                  "(each non-blank line), paragraph (runs of non-blank lines; blank lines separate them). Line "
                  "ends (\\n, \\r\\n) are not part of a line; a paragraph's lines are joined with \\n.")
_BOM = b"\xef\xbb\xbf"
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def file_format(path: str) -> tuple[str, str | None]:
    """(format, compression) of `path`, e.g. ("jsonl", "gz") for x.jsonl.gz; UserError if unknown."""
    name = path.lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if comp:
        name = name[: -len(comp)]
    fmt = next((f for f in FORMATS if name.endswith(f)), None)
    if fmt is None and comp:
        fmt = ".jsonl"  # data.gz / data.zst: compressed JSON lines, the common case
    if fmt is None or (fmt in (".parquet", ".arrow") and comp):
        raise UserError(f"--input {path}: unsupported file type; use .jsonl/.json (optionally .gz/.zst), .txt, "
                        ".csv, .parquet, .arrow or a folder written by datasets' save_to_disk")
    return fmt[1:], comp and comp[1:]


def _supported(path: str) -> bool:
    try:
        file_format(path)
        return True
    except UserError:
        return False


def _walk(top: str) -> list[str]:
    """The input files under `top`, sorted by path; a datasets folder's shards in its own order."""
    found: list[tuple[str, list[str]]] = []
    for d, subdirs, names in os.walk(top):
        shards = hf_dataset_files(d)
        if shards is not None:
            subdirs.clear()  # a DatasetDict's split folders were read through it
            found.append((d, shards))
            continue
        found += [(p, [p]) for p in (os.path.join(d, f) for f in names) if _supported(p)]
    return [f for _, files in sorted(found) for f in files]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by `inputs` (files, globs, directories searched recursively), sorted per entry."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = _walk(item)
            if not found:
                raise UserError(f"--input {item}: directory holds no .jsonl/.json/.gz/.zst/.txt/.csv/.parquet/.arrow "
                                "file nor a datasets save_to_disk folder")
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

    kind "jsonl", "line", "paragraph": `data` is raw bytes of whole lines (paragraph: of whole
                  paragraphs), the first being line `first`.
    kind "file":    `data` is the raw bytes of a whole .txt file (one document).
    kind "rows":    `rows[k]` are the values of column `keys[k]`; `where[i]` locates row i.
    kind "objects": `rows[0]` are the elements of a JSON array; `where[i]` locates element i.
    """

    path: str
    kind: str
    first: int = 1
    data: bytes = b""
    rows: list[list] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    size: int = 0  # "rows", "objects": bytes of input they stand for

    @property
    def nbytes(self) -> int:
        return len(self.data) or self.size


def _open_binary(path: str, comp: str | None) -> IO[bytes]:
    if comp == "gz":
        return gzip.open(path, "rb")
    if comp == "zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _last_blank_line_end(buf: bytes) -> int:
    end = 0
    for m in _BLANK_LINE.finditer(buf):
        end = m.end()
    return end


def _line_chunks(path: str, f: IO[bytes], chunk_bytes: int, kind: str) -> Iterator[Chunk]:
    """Chunks of whole lines (kind "paragraph": cut only after a blank line, so no paragraph is split)."""
    line, carry = 1, b""
    first_block = True
    while block := f.read(chunk_bytes):
        if first_block and block.startswith(_BOM):
            block = block[len(_BOM):]
        first_block = False
        buf = carry + block
        cut = _last_blank_line_end(buf) if kind == "paragraph" else buf.rfind(b"\n") + 1
        if cut == 0:  # one line (paragraph) longer than a block: keep reading until it ends
            carry = buf
            continue
        carry = buf[cut:]
        yield Chunk(path, kind, first=line, data=buf[:cut])
        line += buf.count(b"\n", 0, cut)
    if carry:
        yield Chunk(path, kind, first=line, data=carry)


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
                yield Chunk(path, "rows", rows=rows, where=where, size=size)
                rows, where, size = [[] for _ in keys], [], 0
        if where:
            yield Chunk(path, "rows", rows=rows, where=where, size=size)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{reader.line_num + 1}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from e
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e


def iter_chunks(path: str, keys: list[str], chunk_bytes: int = 1 << 20, text_mode: str = "file") -> Iterator[Chunk]:
    """Chunks of `path` in file order; memory stays about `chunk_bytes` whatever the file size (a .txt file in
    text_mode "file" is one document: one chunk)."""
    fmt, comp = file_format(path)
    if fmt in ("parquet", "arrow"):
        for rows, where, size in table_rows(path, fmt, keys, chunk_bytes):
            yield Chunk(path, "rows", rows=rows, where=where, size=size)
        return
    try:
        with _open_binary(path, comp) as f:
            if fmt == "json" and is_json_array(f):
                for items, where, size in iter_array(path, f, chunk_bytes):
                    yield Chunk(path, "objects", rows=[items], where=where, size=size)
            elif fmt in ("jsonl", "json"):
                yield from _line_chunks(path, f, chunk_bytes, "jsonl")
            elif fmt == "csv":
                yield from _csv_chunks(path, f, keys, chunk_bytes)
            elif text_mode != "file":
                yield from _line_chunks(path, f, chunk_bytes, text_mode)
            else:
                data = f.read()
                yield Chunk(path, "file", data=data[len(_BOM):] if data.startswith(_BOM) else data)
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

    A bad line, row or element (malformed JSON, not an object, missing key, value not a string, bad
    UTF-8) raises UserError naming file and line, or is skipped for every key when `skip_bad_lines`.
    """
    if chunk.kind == "file":
        return [[_decode(chunk.data, chunk.path, 1, hint="")]], 0  # a whole document: nothing to skip
    if chunk.kind == "rows":
        return _collect(_row_records(chunk, keys), keys, skip_bad_lines, "row")
    if chunk.kind == "objects":
        records = (_object_record(obj, keys, where) for obj, where in zip(chunk.rows[0], chunk.where))
        return _collect(records, keys, skip_bad_lines, "element")
    try:
        lines: list[str | None] = chunk.data.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # rare: find the bad lines one by one, in order with other errors
        lines = [_decode_or_none(raw) for raw in chunk.data.split(b"\n")]
    if chunk.kind != "jsonl":
        return _parse_text(chunk, lines, skip_bad_lines)
    return _collect(_jsonl_records(chunk, lines, keys, skip_bad_lines), keys, skip_bad_lines, "line")


def _collect(records: Iterator[tuple[str, list | None, str | None]], keys: list[str], skip_bad_lines: bool,
             unit: str) -> tuple[list[list[str]], int]:
    """Texts per key from (where, the texts of `keys`, None) or (where, None, problem) records, and the
    number of bad records skipped."""
    texts: list[list[str]] = [[] for _ in keys]
    bad = 0
    for where, values, problem in records:
        if problem:
            if not skip_bad_lines:
                raise UserError(f"{where}: {problem}; fix the {unit} or pass --skip-bad-lines")
            bad += 1
            continue
        for col, v in zip(texts, values):
            col.append(v)
    return texts, bad


def _jsonl_records(chunk: Chunk, lines: list[str | None], keys: list[str], skip_bad_lines: bool):
    for i, line in enumerate(lines):
        if line is None:
            if not skip_bad_lines:
                _decode(chunk.data.split(b"\n")[i], chunk.path, chunk.first + i)  # raises, naming line and column
            yield "", None, "not valid UTF-8"
            continue
        if not line.strip():
            continue  # blank lines separate nothing and are not documents
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{chunk.path}:{chunk.first + i}", None, f"malformed JSON ({e.msg} at column {e.colno})"
            continue
        yield _object_record(obj, keys, f"{chunk.path}:{chunk.first + i}")


def _object_record(obj, keys: list[str], where: str) -> tuple[str, list | None, str | None]:
    """(where, the texts of `keys`, None) for a JSON document, or (where, None, what is wrong with it): it must be
    an object with a string under each key."""
    if not isinstance(obj, dict):
        problem = f"a JSON {type(obj).__name__}, expected an object"
    elif (k := next((k for k in keys if k not in obj), None)) is not None:
        problem = f"key {k!r} missing (the object has keys {sorted(obj)[:8]}); check --json-keys"
    elif (k := next((k for k in keys if not isinstance(obj[k], str)), None)) is not None:
        problem = f"key {k!r} is a {type(obj[k]).__name__}, expected a string"
    else:
        return where, [obj[k] for k in keys], None
    return where, None, problem


def _row_records(chunk: Chunk, keys: list[str]):
    for i, where in enumerate(chunk.where):
        values = [col[i] for col in chunk.rows]
        bad = next((j for j, v in enumerate(values) if not isinstance(v, str)), None)
        yield where, values, None if bad is None else (f"column {keys[bad]!r} is {type(values[bad]).__name__}, "
                                                       "expected a string")


def _parse_text(chunk: Chunk, lines: list[str | None], skip_bad_lines: bool) -> tuple[list[list[str]], int]:
    """A .txt chunk's documents by text mode (chunk.kind): each non-blank line, or each paragraph."""
    if chunk.kind == "line":
        groups = [[i] for i, line in enumerate(lines) if line is None or line.strip()]
    else:
        groups, current = [], []
        for i, line in enumerate(lines):
            if line is None or line.strip():
                current.append(i)
            elif current:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
    docs: list[str] = []
    bad = 0
    for group in groups:
        undecodable = [i for i in group if lines[i] is None]
        if undecodable:
            if skip_bad_lines:
                bad += 1
                continue
            _decode(chunk.data.split(b"\n")[undecodable[0]], chunk.path, chunk.first + undecodable[0])  # raises
        docs.append("\n".join(lines[i].removesuffix("\r") for i in group))
    return [docs], bad


def read_texts(files: list[str], key: str, text_mode: str = "file", skip_bad_lines: bool = False) -> Iterator[str]:
    """Every document of `files` in order, for tools that read in one process (the tokenizer trainer, eval)."""
    for path in files:
        for chunk in iter_chunks(path, [key], text_mode=text_mode):
            yield from parse_chunk(chunk, [key], skip_bad_lines)[0][0]


def check_text_mode(files: list[str], text_mode: str | None) -> str:
    """The text mode to use: "file" unless given; given, it must apply to some .txt input."""
    if text_mode is not None and not any(file_format(f)[0] == "txt" for f in files):
        raise UserError(f"--text-mode {text_mode} only applies to .txt inputs, and none of the {len(files)} input "
                        "file(s) is one; drop it")
    return text_mode or "file"
