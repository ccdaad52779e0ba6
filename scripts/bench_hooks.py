"""The training-step cost of each hook stabilizer, against the same trainer without it, in one process.

    python scripts/bench_hooks.py [--model tiny_10m] [--seq-len 256] [--micro-batch 8] [--accum 2]
                                  [--steps 3] [--rounds 6] [--json out.json]

Every contender is a full `Trainer` (same model shape, same data, AdamW) whose `train_step` is timed; rounds
interleave the contenders, each round in a new order. The overhead is the median over rounds of (step time with
the stabilizer) / (step time of the plain trainer in the same round) - 1. CPU step times vary by about 10% from
step to step, so run enough rounds (the default 6) for a figure within a few percent.
Goal: at most 5% for the gradient transforms (norm-growth limiter, OrthoGrad, embedding shrink) and the update
transform (update clipping); QK-clip's cost (an extra q k^T per layer) is reported at interval 1 and 10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstable.compose import compose_config  # noqa: E402
from llmstable.trainer import build_trainer  # noqa: E402

CONTENDERS = {
    "plain": [],
    "norm_growth_limiter": ["stabilizer=[norm_growth_limiter]"],
    "orthograd": ["stabilizer=[orthograd]"],
    "emb_grad_shrink": ["stabilizer=[emb_grad_shrink]"],
    "update_clip": ["stabilizer=[update_clip]"],
    "qk_clip": ["stabilizer=[qk_clip]"],
    "qk_clip_interval_10": ["stabilizer=[qk_clip]", "stabilizer.qk_clip.interval=10"],
}
GOAL = {"norm_growth_limiter": 0.05, "orthograd": 0.05, "emb_grad_shrink": 0.05, "update_clip": 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_10m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    trainers = {}
    for name, overrides in CONTENDERS.items():
        cfg = compose_config([
            f"model={args.model}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch * args.accum}", "train.budget_tokens=null",
            "train.max_steps=1000", "train.progress=false", f"train.device={args.device}", "optimizer=adamw",
            *overrides,
        ], run_dir=Path(tempfile.mkdtemp(prefix=f"llmstable-bench-hooks-{name}-")))
        trainers[name] = build_trainer(cfg)
    for trainer in trainers.values():  # warm-up: allocator, optimizer state, the first measurements
        trainer.train_step(1e-4), trainer.train_step(1e-4)
    times = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a new order each round: no position bias
            t = time.perf_counter()
            for _ in range(args.steps):
                trainers[name].train_step(1e-4)
            times[name].append((time.perf_counter() - t) / args.steps)
    step_s = {name: statistics.median(ts) for name, ts in times.items()}
    # Each round's ratio against the plain trainer of the same round, then the median over rounds: a slow period
    # of the machine falls on both sides of a ratio.
    overhead = {name: statistics.median(t / p for t, p in zip(times[name], times["plain"])) - 1
                for name in names if name != "plain"}
    print(f"{torch.get_num_threads()} threads, model {args.model}, seq {args.seq_len}, "
          f"batch {args.micro_batch}x{args.accum}; median of {args.rounds} rounds of {args.steps} steps, ratios paired "
          "by round")
    print(f"{'stabilizer':<22} {'ms/step':>9} {'overhead':>9}  goal")
    print(f"{'plain':<22} {step_s['plain'] * 1e3:>9.1f}")
    for name, value in overhead.items():
        goal = f"<= {GOAL[name]:.0%}" if name in GOAL else "(reported)"
        print(f"{name:<22} {step_s[name] * 1e3:>9.1f} {value:>+9.1%}  {goal}")
    for trainer in trainers.values():
        trainer.log.close()
    if args.json:
        args.json.write_text(json.dumps({"step_s": step_s, "overhead": overhead, "rounds": times}, indent=2))


if __name__ == "__main__":
    main()
