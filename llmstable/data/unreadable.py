"""Why a corpus file cannot be read: the line and the reason, for the error that names the file.

`datasets` reads a file in Arrow blocks, so when it fails the error says neither which document nor why in words
("JSON parse error: Invalid value. in row 0", "generator raised StopIteration", an `EOFError`). Once a read has
failed, `explain` reads the file again on its own, line by line, decompressing it as `datasets` would (by its
suffix), and says what it finds first: an empty file, invalid UTF-8, a line that is not a JSON object, a text field
that holds something other than text, NUL bytes, a compressed file cut short. It runs only after a failure, on that
one file, so a corpus that reads cleanly never pays for it.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

LINES_CHECKED = 10_000_000  # a bound on the scan of a huge file; a problem past it is reported without its line


@dataclass
class Finding:
    reason: str  # what is wrong, with the line: "line 31 is not valid UTF-8 (byte 0xe9 at column 13)"
    fix: str  # what to do about it


def explain(path: str, fmt: str, text_field: str = "text") -> Finding | None:
    """The first problem in the file at `path` read as data.format=fmt, or None if none is found here."""
    try:
        if fmt == "jsonl":
            return _explain_jsonl(path, text_field)
        if fmt == "text":
            return _explain_text(path)
        if fmt == "parquet":
            return _explain_parquet(path)
    except OSError as err:
        return Finding(f"it cannot be opened ({err.strerror or err})", "check the file and its permissions")
    return None


_KINDS = {bool: "true/false", int: "number", float: "number", list: "list", dict: "object", str: "string"}


def text_problem(value, field: str) -> str | None:
    """Why a document's text-field value is not text (None and strings are fine: None is an empty document)."""
    if value is None or isinstance(value, str):
        return None
    return f"{field!r} holds a {_KINDS.get(type(value), type(value).__name__)} ({str(value)[:40]!r}), not text"


# --- the formats -----------------------------------------------------------------------------------------------


def _explain_jsonl(path: str, field: str) -> Finding | None:
    lines = 0
    try:
        if (binary := _binary(path)) is not None:
            return binary
        for number, raw in enumerate(_lines(path), start=1):
            lines = number
            if number > LINES_CHECKED:
                return None
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return _bad_utf8(number, raw, err)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                whole = _whole_json(path) if number == 1 else None
                if whole is not None:
                    return whole
                what = err.msg.removesuffix(" starting at").lower()  # (json's message ends where its position began)
                return Finding(f"line {number} is not valid JSON ({what}, column {err.colno}; the {number - 1} lines "
                               "before it are fine)", "fix or remove that line; each line must be one JSON "
                               "object, e.g. {\"text\": \"...\"}")
            if not isinstance(row, dict):
                return Finding(f"line {number} holds a JSON {_KINDS.get(type(row), 'value')}, not an object",
                               "each line must be one JSON object with the text in data.text_field, e.g. "
                               "{\"text\": \"...\"}")
            if (problem := text_problem(row.get(field), field)) is not None:
                return Finding(f"line {number}: {problem}", "fix that line, or set data.text_field to the key that "
                               "holds the text")
    except (EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as err:
        return _truncated(lines, err)
    if lines == 0:
        return Finding("it is empty (no line at all)", "remove it from data.path")
    return None


def _explain_text(path: str) -> Finding | None:
    try:
        if (binary := _binary(path)) is not None:
            return binary
        data = b"".join(_lines(path))
    except (EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as err:
        return _truncated(None, err)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return Finding(f"byte {err.start} (line {line}) is not valid UTF-8 (0x{data[err.start]:02x})",
                       "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove it")
    return None


def _explain_parquet(path: str) -> Finding | None:
    with open(path, "rb") as f:
        head = f.read(4)
        size = f.seek(0, 2)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        return Finding("it is not a Parquet file (no PAR1 marker at its start and end), or it was cut short",
                       "remove it from data.path, fetch it again, or fix data.format")
    return None


# --- reading ---------------------------------------------------------------------------------------------------


def _lines(path: str) -> Iterator[bytes]:
    """The file's lines as bytes, decompressed by suffix as `datasets` does."""
    opener = _opener(path)
    with opener(path) as f:
        yield from f


def _opener(path: str):
    if path.endswith(".gz"):
        return lambda p: gzip.open(p, "rb")
    if path.endswith(".bz2"):
        return lambda p: bz2.open(p, "rb")
    if path.endswith(".xz"):
        return lambda p: lzma.open(p, "rb")
    if path.endswith(".zst"):
        import zstandard

        return lambda p: zstandard.open(p, "rb")
    return lambda p: open(p, "rb")


def _binary(path: str, probe_bytes: int = 1 << 16) -> Finding | None:
    """A file whose first 64 kB (decompressed) hold a NUL byte: binary data, not text."""
    head = b""
    try:
        for line in _lines(path):
            head += line
            if len(head) >= probe_bytes:
                break
    except (EOFError, zlib.error, lzma.LZMAError, OSError, ValueError):
        pass  # (cut short: the line-by-line reading says where)
    nul = head.find(b"\x00")
    if nul < 0:
        return None
    return Finding(f"it holds NUL bytes (the first at byte {nul}): a binary file, not text",
                   "remove it from data.path, or fix data.format")


def _bad_utf8(number: int, raw: bytes, err: UnicodeDecodeError) -> Finding:
    return Finding(f"line {number} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}; the "
                   f"{number - 1} lines before it are fine)",
                   "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove that line")


def _truncated(lines: int | None, err: Exception) -> Finding:
    where = f" after line {lines}" if lines else ""
    return Finding(f"the compressed data ends early{where} ({type(err).__name__}: {str(err)[:120]}): the file was cut "
                   "short, e.g. by an interrupted download or copy", "fetch or copy it again, or remove it")


def _whole_json(path: str) -> Finding | None:
    """A file that is one JSON document spread over lines (not JSON lines) that `datasets` could not take."""
    try:
        whole = json.loads(b"".join(_lines(path)).decode("utf-8"))
    except (ValueError, EOFError, OSError, zlib.error, lzma.LZMAError):
        return None
    return Finding(f"it is one JSON {_KINDS.get(type(whole), 'value')} spread over several lines, not JSON lines "
                   "(one object per line)", "write one JSON object per line (`jq -c '.[]' FILE`), or point data.path "
                   "at .jsonl files")
