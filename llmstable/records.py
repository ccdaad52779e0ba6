"""Reading a run's records back: the rows of metrics.jsonl and events.jsonl, for `llmstable spikes`, `report`,
the loss plot and the tests. Writing them is llmstable.metrics' (`RunLog`).

A log may be damaged (a line cut off by a crash, a binary tail left by a failing disk) or hold rows of another
shape (a foreign tool appending to it, a hand edit). The readers skip such lines instead of stopping, and describe
each one in `problems` when asked, so that a tool can say what it skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_NUMBER = (int, float)
# The fields each kind of row must have, and the types a field must have wherever it appears.
METRIC_FIELDS = {"step": int, "tokens": int}
EVENT_FIELDS = {"event": str, "step": int}
EVENT_EXTRA = {"skip_data": ("start", "end")}
FIELD_TYPES = {"tokens": _NUMBER, "to_tokens": _NUMBER, "start": int, "end": int, "samples": int,
               "layer": (int, type(None)), "metric": (str, type(None)), "signal": (str, type(None))}
KINDS = {"list": "list", "str": "string", "int": "number", "float": "number"}


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[dict]:
    """The JSON objects of a .jsonl file, one per line. A line that is not one (a last line cut off by a crash, a
    binary tail, bytes that are not UTF-8, a list) is skipped, and described in `problems` if given."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            row = _parse(raw)
            if isinstance(row, dict):
                rows.append(row)
            elif raw.strip() and problems is not None:
                problems.append(f"line {number} {row}")
    return rows


def read_metrics(path: Path, problems: list[str] | None = None) -> list[dict]:
    """metrics.jsonl's rows that have an integer step and tokens (see read_jsonl for what is skipped)."""
    return _shaped(read_jsonl(path, problems), METRIC_FIELDS, {}, problems)


def read_events(path: Path, problems: list[str] | None = None) -> list[dict]:
    """events.jsonl's rows that have an event name, an integer step, and the fields their kind needs."""
    return _shaped(read_jsonl(path, problems), EVENT_FIELDS, EVENT_EXTRA, problems)


def skipped_warning(path: Path, problems: list[str], shown: int = 3) -> str | None:
    """One warning for the lines of `path` a reader skipped (None if none): how many, and the first few."""
    if not problems:
        return None
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"warning: skipped {len(problems)} line(s) of {path}: {'; '.join(problems[:shown])}{more}"


def _parse(raw: bytes) -> dict | str:
    """The line's JSON object, or why it is not one."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "is not UTF-8 text (binary data)"
    except json.JSONDecodeError:
        return "is not valid JSON (cut off by a crash?)"
    kind = KINDS.get(type(row).__name__, "value")
    return row if isinstance(row, dict) else f"holds a JSON {kind} where an object belongs"


def _shaped(rows: list[dict], required: dict, extra: dict, problems: list[str] | None) -> list[dict]:
    kept = []
    for row in rows:
        wrong = [k for k, t in required.items() if not _typed(row.get(k), t)]
        wrong += [k for k in extra.get(row.get("event"), ()) if k not in row]
        wrong += [k for k, t in FIELD_TYPES.items() if k in row and not _typed(row[k], t)]
        if not wrong:
            kept.append(row)
        elif problems is not None:
            problems.append(f"a row's {', '.join(sorted(set(wrong)))} is missing or of the wrong type: "
                            f"{json.dumps(row)[:60]}")
    return kept


def _typed(value: Any, types) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)  # (no field is a bool, and bool is an int)
