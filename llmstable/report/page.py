"""report.html: one self-contained page (the plots inline as base64 PNG, no script, no stylesheet or font from the
network) with the same tables as report.md. The study table has id "arms" and one body row per arm."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from llmstable.report.markdown import (
    ARM_HEAD, CURVE_HEAD, PLOTS, SETTINGS_HEAD, SPIKES_HEAD, SPIKES_NOTE, arm_cells, choice_text, conclusions,
    correction_text, curve_cells, curve_notes, grid_warnings, setting_cells, spike_cells,
)

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f3f3f3}.warn{color:#a40000;font-weight:bold}img{max-width:100%;display:block;margin:1em 0}"""


def table(table_id: str, head: list[str], rows: list[list[str]]) -> str:
    out = [f'<table id="{table_id}"><thead><tr>', *(f"<th>{escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for cells in rows:
        out.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def inline_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def spike_section(rows: list[dict]) -> list[str]:
    """The Spikes heading and table (id "spikes"), as report.md's."""
    spikes, left_out = spike_cells(rows)
    if not spikes:
        return ["<h2>Spikes</h2>", "<p>No run detected a spike.</p>"]
    out = ["<h2>Spikes</h2>", f"<p>{escape(SPIKES_NOTE)}</p>", table("spikes", SPIKES_HEAD, spikes)]
    if left_out:
        out.append(f"<p>{left_out} more: <code>llmstable spikes RUN_DIR</code> lists a run's own.</p>")
    return out


def html(root: Path, study: dict, ranked: list[dict], rows: list[dict], fair: dict) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>Comparison report</title>',
             f"<style>{STYLE}</style></head><body>", "<h1>Comparison report</h1>",
             f"<p>Baseline: <b>{escape(study['baseline'])}</b>. Each arm at the best LR of its own grid; the loss "
             "is the mean final validation loss over the judged seeds; Δ is the mean paired difference against the "
             "baseline over those seeds (negative is better); speedup is D_eff / D, the tokens the baseline needs "
             "for the arm's loss over the arm's.</p>",
             table("arms", ARM_HEAD, [arm_cells(a) for a in study["arms"]]),
             "<h2>What this can and cannot conclude</h2>", f"<p>{escape(conclusions(study, rows))}</p>",
             "<h2>How the LR was chosen</h2>", f"<p>{escape(choice_text(study))}</p>",
             "<h2>Verdicts and their correction</h2>", f"<p>{escape(correction_text(study))}</p>"]
    warnings = grid_warnings(study)
    if warnings:
        parts += ["<h2>Grid edges</h2><ul>", *(f'<li class="warn">{escape(w)}</li>' for w in warnings), "</ul>"]
    parts += ["<h2>The baseline's budget runs</h2>", table("curve", CURVE_HEAD, curve_cells(study)),
              "<ul>", *(f"<li>{escape(note.replace('**', ''))}</li>" for note in curve_notes(study)), "</ul>"]
    for name, title in PLOTS:
        if (root / name).exists():
            parts += [f"<h2>{escape(title[0].upper() + title[1:])}</h2>",
                      f'<img alt="{escape(title)}" src="{inline_png(root / name)}">']
    parts += ["<h2>Every setting</h2>",
              table("settings", SETTINGS_HEAD, [setting_cells(i, e, rows) for i, e in enumerate(ranked, 1)]),
              *spike_section(rows), "<h2>Same start</h2><ul>"]
    for seed, checks in fair["same_start_by_seed"].items():
        parts.append(f"<li>seed {escape(seed)}: identical initial weights: "
                     f"{'yes' if checks['initial_weights'] else 'NO'}; identical first batch: "
                     f"{'yes' if checks['first_batch'] else 'NO'}</li>")
    parts += ["</ul>", "<h2>What differs between runs</h2>",
              f"<p>{escape(', '.join(fair['differs']) or 'nothing')}</p>", "</body></html>"]
    return "\n".join(parts) + "\n"
