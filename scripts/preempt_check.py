"""Preemption at a random moment, many times: SIGTERM sent from outside to `llmstable train` at a random time, then
the same command again, must give the uninterrupted run's metrics bit for bit.

    python scripts/preempt_check.py [--trials 20] [--steps 60] [--seed 0] [--json out.json]

One uninterrupted reference run, then `--trials` runs, each signalled once at a moment drawn uniformly between the
first metrics row and the reference's duration (so it lands in training, evaluation, checkpointing or logging),
then resumed by the same command. A trial counts as identical when every (step, kind) metrics row but the timing
ones equals the reference's. A signal that arrives after the run finished (exit 0, or killed in the process's
teardown after its summary was written, with no checkpoint owed) is reported and redrawn. Runs one process at a
time (one torch thread), so it measures nothing and times nothing: it is a check, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstable.metrics import read_jsonl  # noqa: E402

TINY = ["model=tiny_1m", "data.seq_len=32", "data.tokenizer.vocab_size=512", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.budget_tokens=null", "train.log_interval=1", "train.eval_interval=7",
        "train.eval_samples=32", "train.checkpoint_interval=10", "train.progress=false", "train.sample_tokens=0",
        "train.plot=false", "schedule.warmup_steps=5"]


def command(run: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "llmstable.cli", "train", *TINY, f"train.max_steps={steps}", f"run_dir={run}"]


def rows(run: Path) -> dict:
    out = {}
    for r in read_jsonl(run / "metrics.jsonl"):
        out[(r["step"], "train" if "train/loss" in r else "val")] = {k: v for k, v in r.items()
                                                                   if not k.startswith("perf/")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="llmstable-preempt-") as tmp:
        reference = Path(tmp) / "reference"
        began = time.perf_counter()
        subprocess.run(command(reference, args.steps), env=env, check=True, capture_output=True)
        duration = time.perf_counter() - began
        want = rows(reference)
        trials, attempts = [], 0
        while len(trials) < args.trials:
            attempts += 1
            run = Path(tmp) / f"attempt{attempts}"  # a fresh directory each time (a redrawn one holds a finished run)
            trial = one_trial(run, args.steps, env, rng, duration)
            if trial is None:
                print("  (the run had finished when the signal came: drawn again)")
                shutil.rmtree(run)
                continue
            trial["identical"] = rows(run) == want
            trials.append(trial)
            print(f"trial {len(trials):2d}: SIGTERM after {trial['after_s']:.2f} s, stopped at step "
                  f"{trial['stopped_at']}{' in evaluation' if trial['in_eval'] else ''}, exit {trial['exit']}, "
                  f"resume identical: {trial['identical']}")
    good = sum(t["identical"] and t["exit"] == 75 for t in trials)
    print(f"{good} of {len(trials)} preempted runs resumed bit-identical to the uninterrupted one (goal: all)")
    if args.json:
        args.json.write_text(json.dumps({"trials": trials, "identical": good}, indent=1))
    return 0 if good == len(trials) else 1


def one_trial(run: Path, steps: int, env: dict, rng: random.Random, duration: float) -> dict | None:
    process = subprocess.Popen(command(run, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    started = time.perf_counter()
    while not ((run / "metrics.jsonl").exists() and read_jsonl(run / "metrics.jsonl")):
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read()[-2000:])
        time.sleep(0.01)
    first_row = time.perf_counter() - started
    wait = rng.uniform(0, max(duration - first_row, 0.1))
    time.sleep(wait)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    events = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "preempted"]
    if process.returncode == 0 or (not events and (run / "summary.json").exists()):
        return None  # the run had finished (the signal came after its end, or in the process's teardown)
    resumed = subprocess.run(command(run, steps), env=env, capture_output=True, text=True)
    return {"after_s": first_row + wait, "exit": process.returncode, "stopped_at": events[0]["step"] if events else None,
            "in_eval": bool(events and events[0].get("eval_pending")), "resume_exit": resumed.returncode,
            "stderr_tail": err[-300:] if process.returncode != 75 else ""}


if __name__ == "__main__":
    sys.exit(main())
