"""The CLI's one error path (llmstable/errors.py): which exceptions are the user's, with which exit code, and what
an unexpected one says."""

import errno
import importlib
import pickle

import pytest

from llmstable.errors import (
    EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_WRITE_FAILED, USER_ERRORS, classify, debug_requested, run_command,
)


@pytest.mark.parametrize("qualified", sorted(USER_ERRORS))
def test_every_user_error_class_named_in_the_table_exists(qualified):
    # The table names classes instead of importing them (no torch for `llmstable spikes`); a renamed or moved class
    # would silently become an "unexpected" error, so each name must still resolve to an exception class.
    module, _, name = qualified.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, Exception)


def test_user_errors_keep_their_message_and_code():
    from llmstable.checkpoint import CheckpointError, CheckpointWriteError
    from llmstable.config import ConfigError
    from llmstable.data.prepare import PrepareWorkerDied

    assert classify(ConfigError(["optimizer.lr=inf must be finite"])) == (
        EXIT_ERROR, "error: invalid configuration:\n  - optimizer.lr=inf must be finite")
    assert classify(CheckpointWriteError("disk full at X")) == (EXIT_WRITE_FAILED, "error: disk full at X")
    assert classify(CheckpointError("bad")) == (EXIT_ERROR, "error: bad")
    assert classify(PrepareWorkerDied("worker died")) == (EXIT_ERROR, "error: worker died")  # (a DataError)


def test_an_os_error_names_its_path_and_the_usual_fix():
    code, text = classify(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"))
    assert code == EXIT_ERROR
    assert text == ("error: Read-only file system: /mnt/ro/run (the file system is read-only: choose a path on a "
                    "writable disk)")


def test_an_unexpected_error_says_where_it_was_raised_and_how_to_get_the_traceback():
    def broken(args):
        return {}["missing"]

    code, text = classify(_raised(broken))
    assert code == EXIT_BUG
    assert text.startswith("error: unexpected KeyError: 'missing' (raised at tests/test_errors.py:")
    assert "--debug" in text and "LLMSTABLE_DEBUG=1" in text and "Traceback" not in text


def test_a_refused_pickle_never_passes_on_the_advice_to_load_it_anyway():
    err = pickle.UnpicklingError("Weights only load failed... re-run torch.load with weights_only=False ...")
    code, text = classify(err)
    assert code == EXIT_ERROR and "weights_only" not in text and "refused" in text


def test_run_command_turns_any_exception_into_one_paragraph_and_its_code(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert run_command(lambda args: None, []) == 0
    assert run_command(lambda args: 3, []) == 3
    assert run_command(interrupted, []) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_debug_is_asked_for_by_flag_anywhere_or_by_environment(monkeypatch):
    monkeypatch.delenv("LLMSTABLE_DEBUG", raising=False)
    assert debug_requested(["generate", "--debug", "run"]) == (True, ["generate", "run"])
    assert debug_requested(["generate", "run"]) == (False, ["generate", "run"])
    monkeypatch.setenv("LLMSTABLE_DEBUG", "1")
    assert debug_requested(["generate"]) == (True, ["generate"])


def _raised(function):
    try:
        function([])
    except Exception as err:  # noqa: BLE001
        return err
    raise AssertionError("did not raise")
