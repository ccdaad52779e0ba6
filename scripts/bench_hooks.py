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
import time

import torch

from bench_trainers import build_trainers, close, rotated_rounds, trainer_flags

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
    trainer_flags(parser, rounds=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    args = parser.parse_args()

    trainers = build_trainers(args, CONTENDERS, "hooks")
    for trainer in trainers.values():  # warm-up: allocator, optimizer state, the first measurements
        trainer.train_step(1e-4), trainer.train_step(1e-4)

    def per_step(trainer) -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(1e-4)
        return (time.perf_counter() - t) / args.steps

    times = rotated_rounds(trainers, args.rounds, per_step)
    names = list(trainers)
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
    close(trainers)
    if args.json:
        args.json.write_text(json.dumps({"step_s": step_s, "overhead": overhead, "rounds": times}, indent=2))


if __name__ == "__main__":
    main()
