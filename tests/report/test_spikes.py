"""`llmstable spikes RUN_DIR` and the spike marks of loss.png, from a run directory's events."""

import json

from llmstable.cli import main
from llmstable.loss_plot import plot_losses
from llmstable.report.spikes import spike_rows

EVENTS = [
    {"event": "start", "step": 0},
    {"event": "spike_warning", "step": 40, "signal": "precond", "value": 0.71, "threshold": 0.5, "layer": 1},
    {"event": "spike", "step": 50, "tokens": 5000, "metric": "loss", "value": 9.1, "threshold": 6.2, "rule": "window",
     "layer": 2},
    {"event": "rollback", "step": 50, "tokens": 5000, "to_step": 25, "to_tokens": 2500},
    {"event": "skip_data", "step": 50, "tokens": 5000, "start": 800, "end": 1664, "samples": 864},
    {"event": "spike", "step": 60, "tokens": 6000, "metric": "grad_norm", "value": 40.0, "threshold": 3.0,
     "rule": "ema_ratio", "layer": 0},
    {"event": "skip_step", "step": 60, "tokens": 6000},
]


def write_run(tmp_path):
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EVENTS))
    rows = [{"step": s, "tokens": 100 * s, "train/loss": 5.0 - s / 100} for s in range(1, 80)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_each_spike_gets_its_action_layer_and_skipped_range():
    rows = spike_rows(EVENTS)
    assert [(r["step"], r["action"], r["layer"], r["skipped samples"]) for r in rows] == [
        (40, "warning", 1, "-"), (50, "rollback", 2, "[800, 1664)"), (60, "skip_step", 0, "-")]


def test_a_spike_logged_again_after_a_resume_is_listed_once():
    """Killed at step 70 after the checkpoint of step 55: the resumed run computes steps 56-70 again and logs the
    spike of step 60 again; the spikes before the checkpoint stay."""
    events = [*EVENTS, {"event": "resume", "step": 55, "tokens": 5500}, *EVENTS[5:]]
    assert [(r["step"], r["action"]) for r in spike_rows(events)] == [
        (40, "warning"), (50, "rollback"), (60, "skip_step")]


def test_the_command_prints_the_table(tmp_path, capsys):
    assert main(["spikes", str(write_run(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["step", "metric", "value", "threshold", "action", "layer", "skipped",
                                           "samples"]
    assert "[800, 1664)" in out and "rollback" in out
    assert main(["spikes", str(tmp_path / "missing")]) == 2


def test_loss_png_marks_spikes_with_their_layer(tmp_path):
    out = plot_losses(write_run(tmp_path))
    assert out.is_file() and out.stat().st_size > 10_000
