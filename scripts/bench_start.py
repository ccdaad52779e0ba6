"""Time to the first step on a large prepared corpus against a small one: a start must not grow with the corpus.

    python scripts/bench_start.py [--large-mb 2048] [--small-mb 20] [--rounds 3] [--json out.json]

Both corpora are real prepared directories: the default corpus is prepared once (`llmstable prepare`, its
tokenizer and validation shard kept), then its training shards are replaced by token shards of the given sizes
(random ids below the vocabulary, 256 MB per shard), with their manifest and the verified-shards record written as
`prepare` writes them. Each round runs `llmstable train data=prepared data.path=DIR` for one step on tiny_1m, once
per corpus, in alternating order; the time is the whole command's (start-up, the corpus checks, the first step).
Goal (issue 22): the large corpus's median at most 1.2x the small one's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARD_MB = 256
RUN = ["model=tiny_1m", "data.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=4",
       "train.budget_tokens=null", "train.max_steps=1", "train.eval_samples=4", "train.progress=false",
       "train.sample_tokens=0", "train.plot=false", "train.checkpoint_interval=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-mb", type=int, default=2048)
    parser.add_argument("--small-mb", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmstable-bench-start-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run([sys.executable, "-m", "llmstable.cli", "prepare", f"out={base}"], check=True,
                       capture_output=True)
        corpora = {f"{mb} MB": corpus_of(base, tmp / f"c{mb}", mb) for mb in (args.small_mb, args.large_mb)}
        times: dict[str, list[float]] = {name: [] for name in corpora}
        for r in range(args.rounds):
            for name in (list(corpora) if r % 2 == 0 else list(reversed(corpora))):
                began = time.perf_counter()
                subprocess.run([sys.executable, "-m", "llmstable.cli", "train", "data=prepared",
                                f"data.path={corpora[name]}", *RUN, f"run_dir={tmp}/run-{r}-{name.split()[0]}"],
                               check=True, capture_output=True)
                times[name].append(time.perf_counter() - began)
    small, large = (f"{args.small_mb} MB", f"{args.large_mb} MB")
    result = {"rounds": args.rounds, "seconds": times, "median_s": {k: statistics.median(v) for k, v in times.items()}}
    result["ratio"] = result["median_s"][large] / result["median_s"][small]
    for name, values in times.items():
        print(f"{name:>8}: first step after {statistics.median(values):.2f} s (rounds: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    print(f"{large} / {small}: {result['ratio']:.3f} (goal <= 1.2)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def corpus_of(base: Path, root: Path, megabytes: int) -> Path:
    """A prepared directory like `base` whose training shards hold `megabytes` of random token ids."""
    from llmstable.data.shards import record_verified

    manifest = json.loads((base / "manifest.json").read_text())
    root.mkdir()
    shutil.copytree(base / "tokenizer", root / "tokenizer")
    for entry in manifest["val"]:
        shutil.copy2(base / entry["file"], root / entry["file"])
    dtype = np.dtype(manifest["dtype"])
    rng = np.random.default_rng(0)
    train, left = [], megabytes * 2**20 // dtype.itemsize
    while left > 0:
        tokens = min(left, SHARD_MB * 2**20 // dtype.itemsize)
        ids = rng.integers(0, manifest["vocab_size"], tokens, dtype=dtype)
        name = f"train-{len(train):05d}.bin"
        ids.tofile(root / name)
        train.append({"file": name, "tokens": int(tokens), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()})
        left -= tokens
    manifest.update(train=train, train_tokens=sum(e["tokens"] for e in train))
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    record_verified(root, train + manifest["val"])  # as prepare records the shards it wrote
    return root


if __name__ == "__main__":
    main()
