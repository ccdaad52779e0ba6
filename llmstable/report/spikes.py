"""`llmstable spikes RUN_DIR`: the run's spikes as a table, read from events.jsonl.

One row per spike detection: the step, the metric, its value and threshold, what the guard did (skip_step,
rollback, abort; `replay` when the step was recomputed first), the block it came from (the one that moved first
relative to its own history, see llmstable.stabilizers.localize) and the sample range skipped because of it. Early
warnings (`spike_warning`) and silent-data-corruption suspects (`sdc_suspect`) are listed as rows of their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmstable.errors import ArgumentParser
from llmstable.records import read_events, skipped_warning

ACTIONS = ("skip_step", "rollback", "abort")
COLUMNS = ("step", "metric", "value", "threshold", "action", "layer", "skipped samples")


def spike_rows(events: list[dict]) -> list[dict]:
    """Table rows from events.jsonl's events, in file order. A spike's action is the skip_step, rollback or abort
    event logged right after it at the same step; its skipped range, the skip_data event of that rollback. Each
    row also keeps the event's `tokens` (for plots), which the table does not show. A resume from step S drops the
    rows after S: the resumed run computes those steps again and logs what it finds (a bit-exact resume, the same
    spikes), as metrics.jsonl's last row for a step is the one that counts."""
    rows = []
    for i, e in enumerate(events):
        kind = e.get("event")
        if kind == "resume":
            rows = [r for r in rows if r["step"] <= e["step"]]
        elif kind == "spike":
            after = [f for f in events[i + 1: i + 8] if f.get("step") == e["step"]]
            action = next((f["event"] for f in after if f.get("event") in ACTIONS), "-")
            skip = next((f for f in after if f.get("event") == "skip_data"), None)
            rows.append({"step": e["step"], "metric": e.get("metric"), "value": e.get("value"),
                         "threshold": e.get("threshold"), "action": action, "layer": e.get("layer", "-"),
                         "skipped samples": f"[{skip['start']}, {skip['end']})" if skip else "-",
                         "tokens": e.get("tokens")})
        elif kind == "spike_warning":
            rows.append({"step": e["step"], "metric": e.get("signal"), "value": e.get("value"),
                         "threshold": e.get("threshold"), "action": "warning", "layer": e.get("layer", "-"),
                         "skipped samples": "-", "tokens": e.get("tokens")})
        elif kind == "sdc_suspect":
            rows.append({"step": e["step"], "metric": "replay", "value": e.get("first"), "threshold": e.get("replayed"),
                         "action": f"sdc_suspect ({e.get('action', 'continue')})", "layer": "-",
                         "skipped samples": "-", "tokens": e.get("tokens")})
    return rows


def cell(v) -> str:
    """One table cell: floats to 4 significant digits, an SDC suspect's per-metric values as `metric value, ...`."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:.6g}" if isinstance(x, (int, float)) else f"{k} {x}" for k, x in v.items())
    return str(v)


def format_table(rows: list[dict]) -> str:
    table = [list(COLUMNS)] + [[cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def spikes_command(args: list[str]) -> int:
    parser = ArgumentParser(prog="llmstable spikes", description="Print the run's spikes as a table.")
    parser.add_argument("run_dir", help="a run directory (reads its events.jsonl)")
    ns = parser.parse_args(args)
    path = Path(ns.run_dir) / "events.jsonl"
    if not path.is_file():
        print(f"error: {path} does not exist: pass a run directory of llmstable train", file=sys.stderr)
        return 2
    problems: list[str] = []
    rows = spike_rows(read_events(path, problems))
    if warning := skipped_warning(path, problems):  # damaged or foreign lines: skipped, and said so
        print(warning, file=sys.stderr)
    if not rows:
        print(f"no spikes, warnings or SDC suspects in {path}")
        return 0
    print(format_table(rows))
    return 0
