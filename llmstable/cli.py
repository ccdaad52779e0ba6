"""The `llmstable` command: `train` (a Hydra app), `export` and `generate`.

    llmstable train [Hydra overrides]          e.g. llmstable train model=tiny_10m train.max_steps=500
    llmstable prepare out=DIR [data overrides] e.g. llmstable prepare data=c4 out=prepared/c4
    torchrun --nproc_per_node 2 -m llmstable.train distributed=fsdp2 run_dir=runs/x [Hydra overrides]
    llmstable export RUN_OR_CHECKPOINT OUT_DIR [--overwrite]
    llmstable generate RUN_OR_CHECKPOINT --prompt "Fellow citizens" [--max-new-tokens 100]
    llmstable compare compare=quick_cpu [compare.seeds=[0,1]] [train overrides]
    llmstable report SWEEP_DIR
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path

import llmstable  # noqa: F401  (sets the offline defaults before any Hugging Face import)
from llmstable.config import ConfigError, TrainConfig, load_config, schema_keys

CONFIG_DIR = Path(os.environ.get("LLMSTABLE_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
GROUPS = ("model", "data", "optimizer", "schedule", "stabilizer", "fault", "distributed", "arm", "experiment")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from llmstable.compare import compare_command
    from llmstable.report import report_command

    commands = {"train": train_command, "export": export_command, "generate": generate_command,
                "compare": compare_command, "report": report_command, "prepare": prepare_command}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:]) or 0


def register_resolvers() -> None:
    """The `llmstable_or` interpolation of configs/train.yaml, and the typed schema (`llmstable_schema` in Hydra's
    ConfigStore: `llmstable train --config-name llmstable_schema --cfg job` prints every key and default)."""
    from omegaconf import OmegaConf

    from llmstable.config import register_schemas

    register_schemas()

    if not OmegaConf.has_resolver("llmstable_or"):
        OmegaConf.register_new_resolver("llmstable_or", lambda value, default: value if value is not None else default)


def check_override_keys(overrides: list[str]) -> list[str]:
    """Problems with `key=value` overrides whose key the schema does not know (Hydra alone would name the key
    but not list the valid ones). Group selections, `+key`, `~key` and `hydra.*` are left to Hydra."""
    valid = set(schema_keys(TrainConfig))
    prefixes = {k.rsplit(".", 1)[0] for k in valid if "." in k} | set(GROUPS)
    problems = []
    for item in overrides:
        if item.startswith(("-", "+", "~", "hydra.", "hydra/")) or "=" not in item:
            continue
        key = item.split("=", 1)[0]
        if key in valid or key in prefixes:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in valid if k.rsplit(".", 1)[0] == parent) if parent else sorted(
            {k.split(".")[0] for k in valid})
        near = difflib.get_close_matches(key, sorted(valid) + list(GROUPS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        problems.append(f"unknown config key {key!r}{hint}; valid keys here: {', '.join(siblings)}")
    return problems


def compose_config(overrides: list[str], run_dir: str | Path | None = None) -> TrainConfig:
    """The typed config `llmstable train OVERRIDES` would run, composed with Hydra's compose API (for tests,
    notebooks and scripts). run_dir, if given, overrides the config's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    problems = check_override_keys(overrides)
    unknown = {p.split("'")[1] for p in problems}
    known = [o for o in overrides if o.split("=", 1)[0] not in unknown]
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        raw = compose(config_name="train", overrides=known)
    container = OmegaConf.to_container(raw, resolve=True)
    container.pop("hydra", None)
    if run_dir is not None:
        container["run_dir"] = str(run_dir)
    try:
        cfg = load_config(container)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def train_command(overrides: list[str]) -> int:
    from hydra.errors import HydraException

    if not any(o in ("-m", "--multirun") or o.startswith("-") for o in overrides):
        # Validate before Hydra starts, so that every problem is reported at once and no run directory is made
        # for a config that cannot run. (Sweeps are validated per job, inside the app.)
        try:
            compose_config(overrides, run_dir="unused-for-validation")
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except HydraException as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    import hydra
    from omegaconf import DictConfig, OmegaConf

    register_resolvers()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
    def hydra_train(raw: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        from llmstable.checkpoint import CheckpointError
        from llmstable.data import DataError
        from llmstable.trainer import SpikeAbort, train

        container = OmegaConf.to_container(raw, resolve=True)
        if container.get("run_dir") is None:
            container["run_dir"] = HydraConfig.get().runtime.output_dir
        try:
            summary = train(load_config(container))
        except (ConfigError, DataError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except SpikeAbort as err:
            print(f"aborted: {err}", file=sys.stderr)
            from hydra.types import RunMode

            if HydraConfig.get().mode == RunMode.MULTIRUN:  # in a sweep, an aborted arm is a result
                return json.loads((Path(container["run_dir"]) / "summary.json").read_text())
            sys.exit(3)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary, indent=2))
        return summary

    from llmstable.parallel.world import launched_world_size

    if launched_world_size() > 1:
        if not any(o.startswith("run_dir=") for o in overrides):
            print("error: a distributed launch (WORLD_SIZE>1) needs run_dir=PATH, the same on every rank (Hydra's "
                  "timestamped default could differ between ranks)", file=sys.stderr)
            return 2
        if int(os.environ.get("RANK", "0")) != 0:  # one writer of Hydra's own files
            overrides = [*overrides, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    sys.argv = ["llmstable train", *overrides]
    hydra_train()
    return 0


def prepare_command(args: list[str]) -> int:
    """Tokenize the `data` config's corpus into token shards in out=DIR (llmstable/data/prepare.py)."""
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
    from llmstable.export import ExportError, export_hf

    parser = argparse.ArgumentParser(prog="llmstable export", description="Write a Hugging Face LlamaForCausalLM folder.")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("out_dir", help="the folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    ns = parser.parse_args(args)
    try:
        out = export_hf(ns.path, ns.out_dir, overwrite=ns.overwrite)
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {ns.path} -> {out}")
    return 0


def generate_command(args: list[str]) -> int:
    from llmstable.export import ExportError, load_trained
    from llmstable.generate import sample_text

    parser = argparse.ArgumentParser(prog="llmstable generate", description="Print a short sample.")
    parser.add_argument("path", help="a run directory or a checkpoint directory")
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    try:
        model, tokenizer, _ = load_trained(ns.path)
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(sample_text(model, tokenizer, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_k, ns.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
