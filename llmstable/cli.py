"""The `llmstable` command: `train` (a Hydra app), `export` and `generate`.

    llmstable train [Hydra overrides]          e.g. llmstable train model=tiny_10m train.max_steps=500
    llmstable prepare out=DIR [data overrides] e.g. llmstable prepare data=c4 out=prepared/c4
    torchrun --nproc_per_node 2 -m llmstable.train distributed=fsdp2 run_dir=runs/x [Hydra overrides]
    llmstable export RUN_OR_CHECKPOINT OUT_DIR [--overwrite] [--trust-checkpoint]
    llmstable generate RUN_OR_CHECKPOINT --prompt "Fellow citizens" [--max-new-tokens 100] [--trust-checkpoint]
    llmstable compare compare=quick_cpu [compare.seeds=[0,1]] [train overrides]
    llmstable report SWEEP_DIR
    llmstable spikes RUN_DIR                   the run's spikes: step, metric, value, threshold, action, layer, skipped
    llmstable verify PATH                      hash every file of a prepared corpus, a checkpoint or a run's checkpoints
"""

from __future__ import annotations

import argparse
import sys

import llmstable  # noqa: F401  (sets the offline defaults before any Hugging Face import)
from llmstable.config import ConfigError


COMMANDS = {  # name -> (module, function), None for this module: only the chosen command's module is imported
    "train": ("llmstable.train", "train_command"), "export": (None, "export_command"),
    "generate": (None, "generate_command"), "compare": ("llmstable.compare", "compare_command"),
    "report": ("llmstable.report", "report_command"), "prepare": (None, "prepare_command"),
    "spikes": ("llmstable.spikes", "spikes_command"), "verify": ("llmstable.verify", "verify_command"),
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, name = COMMANDS[argv[0]]
    try:
        command = globals()[name] if module is None else getattr(importlib.import_module(module), name)
        return command(argv[1:]) or 0
    except KeyboardInterrupt:  # (a run in training checkpoints on Ctrl-C instead: llmstable.preemption)
        print("\ninterrupted", file=sys.stderr)
        return 130


TRUST_HELP = ("also read a DCP or DeepSpeed checkpoint written under another account (its files are unpickled, "
              "which can run code: only for checkpoints from someone you trust)")


def prepare_command(args: list[str]) -> int:
    """Tokenize the `data` config's corpus into token shards in out=DIR (llmstable/data/prepare.py)."""
    from llmstable.compose import compose_config
    from llmstable.data import DataError
    from llmstable.data.prepare import prepare_summary

    outs = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    if len(outs) != 1 or not outs[0]:
        print("error: llmstable prepare needs out=DIR once, e.g. llmstable prepare data=c4 out=prepared/c4",
              file=sys.stderr)
        return 2
    try:
        cfg = compose_config([a for a in args if not a.startswith("out=")], run_dir="unused-by-prepare")
        print(prepare_summary(cfg.data, outs[0], progress=sys.stderr.isatty()))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def export_command(args: list[str]) -> int:
    from llmstable.checkpoint import CheckpointError
    from llmstable.export import LOGITS_NOTE, ExportError, export_hf

    parser = argparse.ArgumentParser(prog="llmstable export", description="Write a Hugging Face LlamaForCausalLM folder.")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("out_dir", help="the folder to create (outside the run directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it holds an earlier export")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ns = parser.parse_args(args)
    try:
        out = export_hf(ns.path, ns.out_dir, overwrite=ns.overwrite, trusted=ns.trust_checkpoint)
    except (ExportError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {ns.path} -> {out}")
    if (out / LOGITS_NOTE).is_file():
        print((out / LOGITS_NOTE).read_text(), file=sys.stderr)
    return 0


def generate_command(args: list[str]) -> int:
    from llmstable.checkpoint import CheckpointError
    from llmstable.export import ExportError, load_trained
    from llmstable.generate import sample_text

    parser = argparse.ArgumentParser(prog="llmstable generate", description="Print a short sample.")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ns = parser.parse_args(args)
    try:
        model, tokenizer, cfg = load_trained(ns.path, trusted=ns.trust_checkpoint)
    except (ExportError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.loss.name != "cross_entropy":
        from llmstable.stabilizers.losses import LOGITS_MEAN

        print(f"(loss={cfg.loss.name}: sampling from {LOGITS_MEAN[cfg.loss.name]})", file=sys.stderr)
    print(sample_text(model, tokenizer, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_k, ns.seed,
                      loss=cfg.loss.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
