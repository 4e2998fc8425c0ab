"""A streaming reader of JSON array files: `[{"text": ...}, {"text": ...}, ...]` (json.dump's output,
pandas' to_json(orient="records"), datasets' to_json(lines=False)).

json.load would hold the whole file, and its objects several times over, in memory; this decodes one
element at a time with the standard library's scanner (json.JSONDecoder.raw_decode) from text read a
block at a time, so memory stays about one block plus the largest element whatever the file size.
"""
import codecs
import json
import re
from typing import IO, Iterator

from megaclm.utils.errors import UserError

_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_BOM = b"\xef\xbb\xbf"


def is_json_array(f: IO[bytes]) -> bool:
    """Whether the buffered binary stream `f` starts (after a BOM and whitespace) with '['; reads nothing."""
    return f.peek(64).removeprefix(_BOM).lstrip()[:1] == b"["


class _Text:
    """The decoded text of `f`, read on demand: buf[pos:] is not consumed yet, `line` is the line of buf[pos]."""

    def __init__(self, path: str, f: IO[bytes], block: int):
        self.path, self.f, self.block = path, f, block
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.at_start = True  # a byte order mark at the start is not text

    def fill(self, at_least: int) -> None:
        """Read one block (at least `at_least` bytes) more; sets `eof` at the end of the file."""
        data = self.f.read(max(self.block, at_least))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            line = self.line + self.buf.count("\n", self.pos) + e.object.count(b"\n", 0, e.start)
            raise UserError(f"{self.path}:{line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); "
                            "convert the file to UTF-8") from e
        if self.at_start and text:
            text, self.at_start = text.removeprefix("\ufeff"), False
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        self.eof = not data

    def advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def next_char(self) -> str:
        """The next non-whitespace character ('' at the end of the file), not consumed."""
        while True:
            self.advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.fill(0)

    def error(self, what: str) -> UserError:
        return UserError(f"{self.path}:{self.line}: {what}; fix the file (a JSON array is one value: "
                         "--skip-bad-lines cannot skip inside it)")


def iter_array(path: str, f: IO[bytes], chunk_bytes: int) -> Iterator[tuple[list, list[str], int]]:
    """(elements, where each one starts, their text size) for about `chunk_bytes` of elements at a time."""
    t = _Text(path, f, chunk_bytes)
    scan = json.JSONDecoder().raw_decode
    t.next_char()
    t.advance(t.pos + 1)  # the '[' that is_json_array saw
    items: list = []
    where: list[str] = []
    size = n = 0
    c = t.next_char()
    if c == "]":
        t.advance(t.pos + 1)
    while c != "]":
        n += 1
        while True:  # decode element n, reading more while it may be incomplete
            try:
                obj, end = scan(t.buf, t.pos)
                # An object, array or string is complete when it decodes; a number may go on ("1" of "1.5").
                if t.eof or t.buf[t.pos] in '{["' or len(t.buf) - end >= 64:
                    break
            except json.JSONDecodeError as e:
                # The scanner fails on a truncated element too: at the end of the text, or in a string.
                if t.eof or not (e.msg.startswith("Unterminated string") or e.pos >= len(t.buf) - 8):
                    t.advance(min(e.pos, len(t.buf)))
                    why = e.msg.removesuffix(" at").removesuffix(" starting")  # "Unterminated string starting at"
                    raise t.error(f"malformed JSON in element {n} of the array ({why})") from e
            t.fill(len(t.buf) - t.pos)  # twice the pending text: linear time in the element's size
        items.append(obj)
        where.append(f"{path}:{t.line}: element {n}")
        size += end - t.pos
        t.advance(end)
        if size >= chunk_bytes:
            yield items, where, size
            items, where, size = [], [], 0
        c = t.next_char()
        if c not in (",", "]"):
            raise t.error(f"expected ',' or ']' after element {n} of the array" if c else
                          "the file ends inside the JSON array (no closing ']'): is it truncated?")
        t.advance(t.pos + 1)
        if c == ",":
            t.next_char()  # the scanner takes no leading whitespace
    if items:
        yield items, where, size
    if t.next_char():
        raise t.error("data after the end of the JSON array")
