"""The `llmstable` command (also `python -m llmstable.cli`, for launchers that start a module).

    llmstable train [overrides]                e.g. llmstable train model=tiny_10m train.budget_tokens=5000000
    llmstable train [overrides] --cfg job      print the composed config (--config-name llmstable_schema: every key)
    llmstable prepare out=DIR [data overrides] e.g. llmstable prepare data=c4 out=prepared/c4
    torchrun --nproc_per_node 2 -m llmstable.cli train distributed=fsdp2 run_dir=runs/x [overrides]
    llmstable export RUN_OR_CHECKPOINT OUT_DIR [--overwrite] [--trust-checkpoint]
    llmstable generate RUN_OR_CHECKPOINT --prompt "Fellow citizens" [--max-new-tokens 100] [--trust-checkpoint]
    llmstable compare compare=quick_cpu [compare.confirm_seeds=[4,5]] [train overrides]
    llmstable report SWEEP_DIR
    llmstable spikes RUN_DIR                   the run's spikes: step, metric, value, threshold, action, layer, skipped
    llmstable verify PATH                      hash every file of a prepared corpus, a checkpoint or a run's checkpoints

Every command reports bad input as one `error:` paragraph naming the key or file and the fix, and exits with a
documented code (llmstable/errors.py: 2 bad input, 3 spike abort, 4 suspected hardware fault, 5 checkpoint write
failed, 75 stopped by a preemption signal after a checkpoint (train), 1 a bug, 130 Ctrl-C). `--debug` anywhere on
the line, or LLMSTABLE_DEBUG=1, also prints the traceback.
"""

from __future__ import annotations

import sys

import llmstable  # noqa: F401  (sets the offline defaults before any Hugging Face import)
from llmstable.errors import EXIT_ERROR, ArgumentParser, debug_requested, run_command, set_debug


COMMANDS = {  # name -> (module, function), None for this module: only the chosen command's module is imported
    "train": ("llmstable.cli.train", "train_command"), "export": (None, "export_command"),
    "generate": (None, "generate_command"), "compare": ("llmstable.compare", "compare_command"),
    "report": ("llmstable.report", "report_command"), "prepare": (None, "prepare_command"),
    "spikes": ("llmstable.report.spikes", "spikes_command"), "verify": ("llmstable.cli.verify", "verify_command"),
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]  # (deepspeed's)
    debug, argv = debug_requested(argv)
    set_debug(debug)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; the commands are: {', '.join(COMMANDS)}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_ERROR
    module, name = COMMANDS[argv[0]]

    def command(args: list[str]) -> int | None:
        function = globals()[name] if module is None else getattr(importlib.import_module(module), name)
        return function(args)

    return run_command(command, argv[1:])


TRUST_HELP = ("also read a DCP or DeepSpeed checkpoint written under another account (its files are unpickled, "
              "which can run code: only for checkpoints from someone you trust)")


def prepare_command(args: list[str]) -> int:
    """Tokenize the `data` config's corpus into token shards in out=DIR (llmstable/data/prepare.py)."""
    from llmstable.compose import compose_config
    from llmstable.data.prepare import prepare_summary

    outs = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    if len(outs) != 1 or not outs[0]:
        print("error: llmstable prepare needs out=DIR once, e.g. llmstable prepare data=c4 out=prepared/c4",
              file=sys.stderr)
        return EXIT_ERROR
    cfg = compose_config([a for a in args if not a.startswith("out=")], run_dir="unused-by-prepare")
    print(prepare_summary(cfg.data, outs[0]))
    return 0


def export_command(args: list[str]) -> int:
    from llmstable.export import LOGITS_NOTE, export_hf

    parser = ArgumentParser(prog="llmstable export", description="Write a Hugging Face LlamaForCausalLM folder.")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("out_dir", help="the folder to create (outside the run directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it holds an earlier export")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ns = parser.parse_args(args)
    out = export_hf(ns.path, ns.out_dir, overwrite=ns.overwrite, trusted=ns.trust_checkpoint)
    print(f"exported {ns.path} -> {out}")
    if (out / LOGITS_NOTE).is_file():
        print((out / LOGITS_NOTE).read_text(), file=sys.stderr)
    return 0


def generate_command(args: list[str]) -> int:
    parser = ArgumentParser(prog="llmstable generate", description="Print a sample, token by token.")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--max-new-tokens", type=int, default=100,
                        help="at most the model's context (model.max_seq_len); more is cut to it, with a note")
    parser.add_argument("--temperature", type=float, default=0.8, help="a finite number >= 0; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (k >= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    ns = parser.parse_args(args)
    from llmstable.generate import check_sampling

    check_sampling(ns.temperature, ns.top_k, ns.max_new_tokens)  # before the model loads: a bad flag fails fast
    from llmstable.export import load_trained
    from llmstable.generate import stream_text
    from llmstable.progress import Progress

    model, tokenizer, cfg = load_trained(ns.path, trusted=ns.trust_checkpoint)
    if cfg.loss.replaces_cross_entropy:
        print(f"(loss={cfg.loss.name}: sampling from {cfg.loss.logits_mean})", file=sys.stderr)
    context = model.cfg.max_seq_len
    tokens = ns.max_new_tokens
    if tokens > context:  # without a KV cache each token costs a forward over the whole context: bound the wait
        print(f"(--max-new-tokens {tokens} is more than the model's context of {context} tokens: generating "
              f"{context}; beyond its context the model would only see the last {context} tokens anyway)",
              file=sys.stderr)
        tokens = context
    # The text itself streams to stdout; where stderr is not a terminal (a scheduler's log), a progress line too.
    with Progress("generate", total=tokens, unit="token", bar=False) as progress:
        for piece in stream_text(model, tokenizer, ns.prompt, tokens, ns.temperature, ns.top_k, ns.seed,
                                 sampler=cfg.loss.samples_from):
            print(piece, end="", flush=True)
            progress.update_to(progress.count + 1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
