"""`llmstable verify PATH`: read every byte of a prepared corpus, a checkpoint, or all of a run's checkpoints, and
compare it with the SHA-256 its manifest records.

A run's start does not do this for a prepared corpus: it checks every shard's size, and hashes only the shards that
are new or changed since they were last verified (llmstable.data.shards), so that starting costs the same at 20 MB
and at 40 GB. A bit flip on disk changes no size or modification time: this command is how to find one. It also
refreshes the corpus's record of verified shards.

Exit codes: 0 every file matches; 1 something does not (each problem is printed, naming the file); 2 PATH is none
of the three.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def verify_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmstable verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a prepared corpus (out= of llmstable prepare), a checkpoint, or a run directory")
    ns = parser.parse_args(args)
    path = Path(ns.path).expanduser()
    began = time.perf_counter()
    kind, problems, checked = _verify(path)
    if kind is None:
        print(f"error: {path} is not a prepared corpus (no {path / 'manifest.json'} of llmstable-token-shards), a "
              "checkpoint (no manifest.json and state.json) or a run directory (no checkpoints/ folder)",
              file=sys.stderr)
        return 2
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    took = time.perf_counter() - began
    if problems:
        print(f"{kind} {path}: {len(problems)} problem(s) in {checked} checked ({took:.1f} s)", file=sys.stderr)
        return 1
    print(f"ok: {kind} {path}: {checked} verified against their SHA-256 ({took:.1f} s)")
    return 0


def _verify(path: Path) -> tuple[str | None, list[str], str]:
    from llmstable import checkpoint as ckpt

    manifest = path / "manifest.json"
    if manifest.is_file() and _is_corpus(manifest):
        return ("prepared corpus", *_verify_corpus(path))
    if manifest.is_file() and (path / "state.json").is_file():
        problem = ckpt.verify(path)
        return "checkpoint", [problem] if problem else [], "1 checkpoint"
    checkpoints = ckpt.list_checkpoints(path / "checkpoints")
    if (path / "checkpoints").is_dir():
        problems = [f"{p}: {problem}" for p in checkpoints if (problem := ckpt.verify(p)) is not None]
        problems += [w for p in checkpoints if (w := ckpt.misnamed(p)) is not None]
        return "run", problems, f"{len(checkpoints)} checkpoint(s)"
    return None, [], ""


def _is_corpus(manifest: Path) -> bool:
    from llmstable.data.shards import FORMAT

    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _verify_corpus(root: Path) -> tuple[list[str], str]:
    import numpy as np

    from llmstable.data.corpus import DataError
    from llmstable.data.shards import read_manifest, verify_shards

    try:
        m = read_manifest(root)
        entries = m["train"] + m["val"]
        problems = verify_shards(root, entries, np.dtype(m["dtype"]), full=True)
    except (DataError, KeyError, TypeError) as err:
        return [str(err)], "its manifest"
    size = sum(e["tokens"] for e in entries) * np.dtype(m["dtype"]).itemsize
    return problems, f"{len(entries)} shard(s), {size / 2**20:,.1f} MiB"
