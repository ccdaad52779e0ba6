"""`train.compile` on this machine: the same run compiled and eager, to decide what `train.compile=auto` means on a
CPU (issue 21: compiled on CUDA, whatever is measured best on CPU).

    python scripts/bench_compile.py [--model tiny_1m] [--steps 60] [--rounds 3] [--json out.json]

Each round runs `llmstable train` twice on the default corpus, once with `train.compile=true` and once with
`train.compile=false`, in alternating order, one process at a time, the same seed, data and steps. Per run: the
whole command's wall time (start-up, compilation, training, the final evaluation and checkpoint) and the steady
training speed (the median of the metrics rows' tokens/s after the first two rows, which carry the compilation).
The ratios compiled / eager are per round, then their median, so a slow minute of the machine falls on both sides
of a ratio. A compile that fails falls back to eager with a warning (`llmstable.compiled`): the script reports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstable.records import read_jsonl  # noqa: E402


def run(tmp: Path, name: str, compiled: bool, args) -> dict:
    run_dir = tmp / name
    argv = [sys.executable, "-m", "llmstable.cli", "train", f"model={args.model}", "train.budget_tokens=null",
            f"train.max_steps={args.steps}", "train.log_interval=10", f"train.eval_interval={args.steps}",
            "train.progress=false", "train.sample_tokens=0", "train.plot=false",
            f"train.compile={str(compiled).lower()}", f"run_dir={run_dir}"]
    began = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "perf/tokens_per_sec" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": wall, "tokens_per_sec": statistics.median(r["perf/tokens_per_sec"] for r in rows[2:]),
            "final_val_loss": summary["final_val_loss"],
            "fell_back": "failed to compile and runs eagerly" in result.stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_1m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.steps < 40:
        sys.exit("--steps must be at least 40: the steady speed needs rows after the first two (logged every 10)")
    runs: dict[str, list[dict]] = {"compiled": [], "eager": []}
    with tempfile.TemporaryDirectory(prefix="llmstable-bench-compile-") as tmp:
        for r in range(args.rounds):
            for kind in (("compiled", "eager") if r % 2 == 0 else ("eager", "compiled")):
                runs[kind].append(run(Path(tmp), f"{kind}-{r}", kind == "compiled", args))
                print(f"round {r + 1} {kind:8s} {runs[kind][-1]}", flush=True)
    ratios = {key: [c[key] / e[key] for c, e in zip(runs["compiled"], runs["eager"])]
              for key in ("wall_s", "tokens_per_sec")}
    result = {"model": args.model, "steps": args.steps, "rounds": args.rounds, "runs": runs,
              "ratio_per_round": ratios, "ratio": {k: statistics.median(v) for k, v in ratios.items()}}
    print(f"compiled / eager, median of {args.rounds} rounds: steady tokens/s {result['ratio']['tokens_per_sec']:.3f}, "
          f"wall time of the whole command {result['ratio']['wall_s']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
