"""What the in-process step benchmarks share (`bench_hooks.py`, `bench_indicators.py`): their command-line flags,
a set of real `Trainer`s that differ only by their overrides, and rounds that time each trainer in a new order.

Ratios are taken per round against a baseline of the same round by the callers, so a slow minute of the machine
falls on both sides of a ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstable.compose import compose_config  # noqa: E402
from llmstable.trainer import build_trainer  # noqa: E402


def trainer_flags(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The model and batch of every contender, the rounds, the device and the JSON output."""
    parser.add_argument("--model", default="tiny_10m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)


def build_trainers(args, contenders: dict[str, list[str]], tag: str) -> dict:
    """One trainer per contender (AdamW, the flags' model and batch, plus its overrides), each in a run directory
    of its own under the system's temporary directory."""
    trainers = {}
    for name, overrides in contenders.items():
        cfg = compose_config([
            f"model={args.model}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch * args.accum}", "train.budget_tokens=null",
            "train.max_steps=100000", "train.progress=false", f"train.device={args.device}", "optimizer=adamw",
            *overrides,
        ], run_dir=Path(tempfile.mkdtemp(prefix=f"llmstable-bench-{tag}-{name}-")))
        trainers[name] = build_trainer(cfg)
    return trainers


def rotated_rounds(trainers: dict, rounds: int, run) -> dict[str, list[float]]:
    """`run(trainer)` -> seconds, for every trainer in each of `rounds` rounds, the order rotating by one each round
    (no trainer always first): {name: [seconds per round]}."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(run(trainers[name]))
    return times


def close(trainers: dict) -> None:
    for trainer in trainers.values():
        trainer.log.close()
