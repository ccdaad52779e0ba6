"""The cost of the logits' indicators (llmstable.indicators: the attention-logit maximum, the output log Z and
maximum) at the default log interval, against the same trainer without them, in one process.

    python scripts/bench_indicators.py [--model tiny_10m] [--seq-len 256] [--micro-batch 8] [--accum 2]
                                       [--log-interval 10] [--rounds 6] [--json out.json]

Two `Trainer`s of the same model, data and AdamW, each stepping `--log-interval` steps per round with the last one
logged (its leading indicators measured: the update norm, the worst block's gradient norm, and in one trainer also
the logits' indicators). The rounds alternate which trainer goes first; the cost is the median over rounds of (the
round's time with the logits' indicators) / (without) - 1, so a slow minute of the machine falls on both sides of
a ratio. Goal: at most 2% of the step time at the default log interval (10). The cost of one logged step alone
(measured the same way, one step per round) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_trainers import build_trainers, close, rotated_rounds, trainer_flags

GOAL = 0.02


class NoLogitIndicators:
    """The trainer's step without the logits' indicators (the rest of the logged step is unchanged)."""

    def begin(self, logged: bool) -> None:
        pass

    def restart(self) -> None:
        pass

    def add_output(self, logits) -> None:
        pass

    def values(self, world) -> dict:
        return {}


def timed(trainer, steps: int, logged_last: bool) -> float:
    t = time.perf_counter()
    for i in range(steps):
        trainer.train_step(1e-4, indicators=logged_last and i == steps - 1)
    return time.perf_counter() - t


def paired(trainers: dict, steps: int, rounds: int, logged_last: bool = True) -> tuple[float, dict]:
    times = rotated_rounds(trainers, rounds, lambda trainer: timed(trainer, steps, logged_last))
    ratio = statistics.median(w / wo for w, wo in zip(times["with"], times["without"]))
    return ratio - 1, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trainer_flags(parser, rounds=6)
    parser.add_argument("--log-interval", type=int, default=10, help="steps per round, the last one logged")
    args = parser.parse_args()

    trainers = build_trainers(args, {"without": [], "with": []}, "indicators")
    trainers["without"].update.logits = NoLogitIndicators()
    for trainer in trainers.values():  # warm-up: allocator, optimizer state, a first logged step
        timed(trainer, 2, logged_last=True)
    cost, times = paired(trainers, args.log_interval, args.rounds)
    step_cost, step_times = paired(trainers, 1, args.rounds)
    step_s = statistics.median(times["without"]) / args.log_interval
    print(f"{torch.get_num_threads()} threads, model {args.model}, seq {args.seq_len}, batch "
          f"{args.micro_batch}x{args.accum}; median of {args.rounds} rounds, ratios paired by round")
    print(f"step without the logits' indicators: {step_s * 1e3:.1f} ms")
    print(f"one logged step: {step_cost:+.2%} (with the attention-logit max, log Z and logit max against without)")
    print(f"every {args.log_interval} steps (the default log interval): {cost:+.2%} of the step time "
          f"(goal <= {GOAL:.0%}): {'met' if cost <= GOAL else 'NOT met'}")
    close(trainers)
    if args.json:
        args.json.write_text(json.dumps({"cost": cost, "logged_step_cost": step_cost, "rounds": times,
                                         "logged_step_rounds": step_times, "step_s": step_s}, indent=2))


if __name__ == "__main__":
    main()
