"""The markers that keep `make test-fast` free of training and processes are checked, not trusted: a test that
reaches a watched door without the marker that declares it fails, naming the marker (tests/conftest.py). Each test
here knocks on a door on purpose; the guard stops it before anything starts."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

import conftest


def refused(request, door) -> str:
    """Call door() in this unmarked test: the guard must fail it; the failure is then taken back."""
    with pytest.raises(pytest.fail.Exception) as err:
        door()
    assert request.node.stash[conftest.UNDECLARED] == str(err.value)
    del request.node.stash[conftest.UNDECLARED]  # (else the report of this test would be turned into a failure)
    return str(err.value)


def start_a_command():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def start_a_worker():
    multiprocessing.get_context("spawn").Process(target=int).start()


def run_a_training_step():
    from llmstable.step import TrainStep

    TrainStep.__call__(None, 1, 1e-3, False, 0)


def open_a_corpus():
    from llmstable.config import DataConfig
    from llmstable.data.loader import open_prepared

    open_prepared(DataConfig())  # the default corpus, through the cache that prepares it on first use


@pytest.mark.parametrize("door, marker", [(start_a_command, "subprocess"), (start_a_worker, "subprocess"),
                                          (run_a_training_step, "trains"), (open_a_corpus, "trains or subprocess")])
def test_an_unmarked_test_that_trains_or_starts_a_process_fails_naming_the_marker(request, door, marker):
    message = refused(request, door)
    assert f"is not marked {marker}: add @pytest.mark." in message and request.node.nodeid in message


def test_preparing_into_a_directory_is_a_door_too(request, tmp_path):
    from llmstable.config import DataConfig
    from llmstable.data.prepare import prepare

    assert "token-shard preparation" in refused(request, lambda: prepare(DataConfig(), tmp_path / "shards"))


@pytest.mark.subprocess
def test_a_marked_test_starts_its_process():
    assert subprocess.run([sys.executable, "-c", "print('ran')"], capture_output=True, text=True).stdout == "ran\n"
