"""Progress in a scheduler's log: plain lines at a steady interval where stderr is not a terminal, the bar where
it is (llmstable/progress.py), and the training loop's lines with the loss."""

import io
import re
import time

import pytest

from llmstable.progress import Progress, duration


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_plain_line_comes_every_interval_with_count_rate_eta_and_fields(monkeypatch):
    monkeypatch.setenv("LLMSTABLE_PROGRESS_S", "0.05")
    log = io.StringIO()
    with Progress("train", total=40, unit="step", stream=log) as progress:
        for step in range(40):
            time.sleep(0.01)
            progress.update(1)
            progress.set_postfix({"loss": f"{5 - step / 10:.3f}"})
    lines = log.getvalue().splitlines()
    assert len(lines) >= 3 and "\r" not in log.getvalue()  # a line per interval, no carriage returns
    pattern = r"train: (\d+)/40 steps \([\d.]+%\), [\d.e+]+ steps/s, ETA \d+s, elapsed \d+s \| loss=[\d.]+"
    counts = [int(re.fullmatch(pattern, line).group(1)) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 40  # the last line is the end
    assert lines[-1].endswith("loss=1.100")


def test_work_shorter_than_an_interval_writes_nothing(monkeypatch):
    monkeypatch.setenv("LLMSTABLE_PROGRESS_S", "30")
    log = io.StringIO()
    with Progress("prepare: hashing", unit="doc", stream=log) as progress:
        progress.update(5)
    assert log.getvalue() == ""


def test_a_line_comes_even_while_one_step_takes_longer_than_the_interval(monkeypatch):
    monkeypatch.setenv("LLMSTABLE_PROGRESS_S", "0.05")
    log = io.StringIO()
    with Progress("generate", total=3, unit="token", stream=log):
        time.sleep(0.3)  # (a step that takes long: the timer thread still writes)
    assert log.getvalue().count("generate: 0/3 tokens") >= 3


def test_a_polled_count_is_read_at_each_line(monkeypatch):
    monkeypatch.setenv("LLMSTABLE_PROGRESS_S", "0.05")
    log, done = io.StringIO(), []
    with Progress("compare", total=4, unit="run", poll=lambda: len(done), stream=log):
        for _ in range(4):
            time.sleep(0.08)
            done.append(1)
    assert "compare: 4/4 runs (100.0%)" in log.getvalue().splitlines()[-1]


def test_on_a_terminal_it_is_the_live_bar_and_no_plain_line(monkeypatch):
    monkeypatch.setenv("LLMSTABLE_PROGRESS_S", "0.01")
    screen = Terminal()
    with Progress("train", total=5, unit="step", stream=screen) as progress:
        progress.update(5)
        time.sleep(0.05)
    assert "\r" in screen.getvalue() and "5/5" in screen.getvalue()  # tqdm's bar
    assert "steps/s, ETA" not in screen.getvalue()
    quiet = Terminal()
    with Progress("generate", total=5, unit="token", bar=False, stream=quiet) as progress:
        progress.update(5)  # (generate streams its text to the terminal instead)
    assert quiet.getvalue() == ""


def test_durations_read_as_hours_minutes_seconds():
    assert [duration(s) for s in (4.2, 75, 3725)] == ["4s", "1m15s", "1h02m05s"]


@pytest.mark.trains
def test_training_writes_plain_progress_lines_with_the_loss_to_a_log(tiny_config, capfd, monkeypatch):
    from llmstable.trainer import train

    monkeypatch.setenv("LLMSTABLE_PROGRESS_S", "0.01")
    train(tiny_config("train.progress=true", "train.max_steps=3"))
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("train: ")]
    assert lines and "\r" not in "".join(lines)
    assert re.fullmatch(r"train: 3/3 steps \(100\.0%\), .* \| loss=[\d.]+ lr=[\d.e+-]+ tok_s=[\d,]+", lines[-1])
