"""Checkpoint costs in the step path, in one process: how long a save blocks the loop when it is written in the
background (a snapshot to CPU memory) against a save written in the loop, and a rollback served from the in-memory
ring against one read from disk, each against the time of a training step.

    python scripts/bench_checkpoint.py [--model llama_60m] [--seq-len 256] [--micro-batch 8] [--rounds 5]
                                       [--json out.json]

The model, optimizer state (AdamW after one step), data and config are those of a real `Trainer`. Rounds alternate
the order of the two saves; each save goes to its own fresh directory, and the background one's write is waited
for (outside the timed part) before the next save. The same bytes must land on disk: the files of the last round's
two checkpoints are compared. Goals (issue 22): a background save blocks for at most 1/5 of a save in the loop; a
rollback from the ring takes at most 2 step times. A rollback is timed as the trainer does it: the restore, then
the rewrite of its target (a snapshot; the write itself goes to the background and is waited for outside the
timed part).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstable.checkpointer import Checkpointer  # noqa: E402
from llmstable.compose import compose_config  # noqa: E402
from llmstable.trainer import build_trainer  # noqa: E402

COMPARED = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmstable-bench-ckpt-") as tmp:
        results = run(args, Path(tmp))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def run(args, tmp: Path) -> dict:
    cfg = compose_config([
        f"model={args.model}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}", "train.budget_tokens=null", "train.max_steps=1000",
        "train.progress=false", "stabilizer=[spike_guard]", "stabilizer.spike_guard.ring_size=1",
    ], run_dir=tmp / "run")
    trainer = build_trainer(cfg)
    trainer.start()
    step_s = []
    for _ in range(4):  # the first builds the optimizer state; the rest time a step
        began = time.perf_counter()
        trainer.train_step(1e-4)
        step_s.append(time.perf_counter() - began)
    trainer.step = 1
    state, config_yaml = trainer.state_dict(), "bench: true\n"
    saves = {"in_loop": [], "background": [], "background_written": []}
    dirs = {}
    for r in range(args.rounds):
        for mode in (("in_loop", "background") if r % 2 == 0 else ("background", "in_loop")):
            dirs[mode] = tmp / f"{mode}-{r}"
            writer = Checkpointer(dirs[mode], trainer.world, keep=1, background=mode == "background", ring_size=0)
            began = time.perf_counter()
            writer.save(trainer.engine, 1, state, config_yaml, good=False)
            saves[mode].append(time.perf_counter() - began)
            writer.wait()
            if mode == "background":
                saves["background_written"].append(time.perf_counter() - began)
        same = all((dirs["in_loop"] / "step_00000001" / f).read_bytes() ==
                   (dirs["background"] / "step_00000001" / f).read_bytes() for f in COMPARED)
        for d in dirs.values():
            shutil.rmtree(d)
    path = trainer.save()  # into the trainer's run: its ring keeps the snapshot
    trainer.run.checkpointer.wait()
    restores = {"ring": [], "disk": []}
    for r in range(args.rounds):
        for mode in (("ring", "disk") if r % 2 == 0 else ("disk", "ring")):
            began = time.perf_counter()
            trainer.restore(path, keep_ledger=True, step=1 if mode == "ring" else None)
            trainer.save(good=True)  # a rollback rewrites its target with the plan carried out (in the background)
            restores[mode].append(time.perf_counter() - began)
            trainer.run.checkpointer.wait()
    trainer.run.close()
    trainer.log.close()
    step = statistics.median(step_s[1:])
    med = {k: statistics.median(v) for k, v in {**saves, **restores}.items()}
    return {
        "model": args.model, "num_params": trainer.sizes["num_params"], "rounds": args.rounds,
        "checkpoint_bytes": trainer.run.last_checkpoint_bytes, "step_s": step, "median_s": med,
        "same_bytes": same,
        "blocking_ratio": med["background"] / med["in_loop"],
        "ring_rollback_in_steps": med["ring"] / step, "disk_rollback_in_steps": med["disk"] / step,
    }


def report(res: dict) -> None:
    med = res["median_s"]
    print(f"{res['model']} ({res['num_params'] / 1e6:.1f}M parameters, checkpoint {res['checkpoint_bytes'] / 2**20:,.0f}"
          f" MiB), median of {res['rounds']} rounds; one training step {res['step_s']:.3f} s")
    print(f"  save in the loop        {med['in_loop']:8.3f} s blocked")
    print(f"  save in the background  {med['background']:8.3f} s blocked ({med['background_written']:.3f} s until "
          f"written): {res['blocking_ratio']:.3f} of the loop's save (goal <= 0.2); same bytes: {res['same_bytes']}")
    print(f"  rollback from the ring  {med['ring']:8.3f} s = {res['ring_rollback_in_steps']:.2f} steps (goal <= 2)")
    print(f"  rollback from disk      {med['disk']:8.3f} s = {res['disk_rollback_in_steps']:.2f} steps")


if __name__ == "__main__":
    main()
