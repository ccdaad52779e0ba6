"""What is wrong in a corpus file `datasets` could not read (llmstable/data/unreadable.py): the line and the
reason, found by reading the file again on its own."""

import bz2
import gzip
import json
import lzma

import pytest

from llmstable.data.unreadable import explain, text_problem

GOOD = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)).encode()


@pytest.mark.parametrize("content, fmt, reason", [
    (b"", "jsonl", "it is empty (no line at all)"),
    (GOOD + b'{"text": "caf\xe9"}\n', "jsonl",
     "line 51 is not valid UTF-8 (byte 0xe9 at column 14; the 50 lines before it are fine)"),
    (GOOD + b'{"text": "cut', "jsonl",
     "line 51 is not valid JSON (unterminated string, column 10; the 50 lines before it are fine)"),
    (GOOD + b'["a list"]\n', "jsonl", "line 51 holds a JSON list, not an object"),
    (GOOD + b'{"text": 7}\n', "jsonl", "line 51: 'text' holds a number ('7'), not text"),
    (json.dumps([{"text": "a"}, {"text": "b"}], indent=1).encode(), "jsonl",
     "it is one JSON list spread over several lines, not JSON lines (one object per line)"),
    (GOOD[:100] + bytes(range(256)), "jsonl", "it holds NUL bytes (the first at byte 100): a binary file, not text"),
    (b"good text " * 10 + b"\xff", "text", "byte 100 (line 1) is not valid UTF-8 (0xff)"),
    (b"PAR1 and nothing else", "parquet",
     "it is not a Parquet file (no PAR1 marker at its start and end), or it was cut short"),
])
def test_the_first_problem_is_named_with_its_line(tmp_path, content, fmt, reason):
    path = tmp_path / f"f.{ {'jsonl': 'jsonl', 'text': 'txt', 'parquet': 'parquet'}[fmt] }"
    path.write_bytes(content)
    assert explain(str(path), fmt).reason == reason


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_a_compressed_file_cut_short_is_named_after_its_last_good_line(tmp_path, suffix, compress):
    data = compress(GOOD * 20)
    path = tmp_path / f"f.jsonl{suffix}"
    path.write_bytes(data[: len(data) // 2])
    finding = explain(str(path), "jsonl")
    assert finding.reason.startswith("the compressed data ends early")  # (after the last line that came out whole)
    assert "cut short" in finding.reason and "fetch or copy it again" in finding.fix
    path.write_bytes(compress(GOOD + b'{"text": "caf\xe9"}\n'))  # decompressed as datasets does, then read
    assert explain(str(path), "jsonl").reason.startswith("line 51 is not valid UTF-8")


def test_a_clean_file_has_nothing_to_explain(tmp_path):
    (tmp_path / "ok.jsonl").write_bytes(GOOD)
    assert explain(str(tmp_path / "ok.jsonl"), "jsonl") is None


def test_only_text_or_nothing_is_a_document():
    assert text_problem(None, "text") is None and text_problem("words", "text") is None
    assert text_problem([1, 2], "body") == "'body' holds a list ('[1, 2]'), not text"
