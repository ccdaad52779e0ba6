"""The report's Spikes section and the spike marks of loss_curves.png, from run directories' events: every spike
with the block it came from, in report.md, report.html and the plot."""

import json
from unittest import mock

import matplotlib.axes

from llmstable.report.markdown import MAX_SPIKE_ROWS, spike_lines
from llmstable.report.page import spike_section
from llmstable.report.plots import plot_best_runs
from llmstable.report.runs import run_spikes

EVENTS = [
    {"event": "start", "step": 0},
    {"event": "spike", "step": 50, "tokens": 5000, "metric": "loss", "value": 9.1, "threshold": 6.2, "layer": 2},
    {"event": "rollback", "step": 50, "tokens": 5000, "to_step": 25},
    {"event": "skip_data", "step": 50, "tokens": 5000, "start": 800, "end": 1664, "samples": 864},
    {"event": "spike_warning", "step": 55, "tokens": 5500, "signal": "precond", "value": 0.7, "threshold": 0.5,
     "layer": 1},
]


def write_run(root, name="adamw_lr0.01_s0", events=EVENTS):
    run = root / name
    run.mkdir()
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    rows = [{"step": s, "tokens": 100 * s, "train/loss": 5.0 - s / 100} for s in range(1, 80)]
    rows += [{"step": s, "tokens": 100 * s, "val/loss": 5.1 - s / 100} for s in range(10, 80, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_runs_spikes_come_with_their_block_action_and_skipped_samples(tmp_path):
    spikes = run_spikes(write_run(tmp_path))
    assert [(s["step"], s["action"], s["layer"], s["skipped samples"], s["tokens"]) for s in spikes] == [
        (50, "rollback", 2, "[800, 1664)", 5000), (55, "warning", 1, "-", 5500)]
    assert run_spikes(tmp_path) == []  # no events.jsonl: no spikes


def test_the_spikes_section_lists_each_spike_with_its_block():
    rows = [{"run": "adamw_lr0.01_s0", "spike_events": [
        {"step": 50, "metric": "loss", "value": 9.1, "threshold": 6.2, "action": "rollback", "layer": 2,
         "skipped samples": "[800, 1664)", "tokens": 5000}]}, {"run": "muon_lr0.01_s0", "spike_events": []}]
    lines = spike_lines(rows)
    assert lines[0] == "## Spikes"
    assert lines[4].split(" | ")[:2] == ["| run", "step"] and "layer" in lines[4]
    assert "| adamw_lr0.01_s0 | 50 | loss | 9.1 | 6.2 | rollback | 2 | [800, 1664) |" in lines
    assert spike_lines([{"run": "a", "spike_events": []}])[-1] == "No run detected a spike."
    many = [{"run": "a", "spike_events": rows[0]["spike_events"] * (MAX_SPIKE_ROWS + 7)}]
    out = spike_lines(many)
    assert sum(line.startswith("| a |") for line in out) == MAX_SPIKE_ROWS
    assert out[-1].startswith("7 more: `llmstable spikes RUN_DIR`")
    page = "".join(spike_section(rows))
    assert '<table id="spikes">' in page and "<td>adamw_lr0.01_s0</td><td>50</td>" in page and "<td>2</td>" in page
    assert "No run detected a spike." in "".join(spike_section([{"run": "a", "spike_events": []}]))
    assert "7 more:" in "".join(spike_section(many))


def test_loss_curves_label_each_spike_with_its_block(tmp_path):
    write_run(tmp_path)
    rows = [{"run": "adamw_lr0.01_s0", "arm": "adamw", "lr": 0.01, "budget_run": False, "tuned_value": None}]
    study = {"arms": [{"arm": "adamw", "best_lr": 0.01}]}
    with mock.patch.object(matplotlib.axes.Axes, "annotate", autospec=True) as annotate:
        plot_best_runs(tmp_path, rows, study)
    labels = [(call.args[1], call.args[2][0]) for call in annotate.call_args_list]
    assert labels == [("L2", 5000)]  # the spike, at its tokens; the warning is not a spike
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
