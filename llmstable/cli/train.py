"""The `llmstable train` command (`python -m llmstable.cli train` for launchers that start a module: `torchrun -m
llmstable.cli train ...`, `deepspeed --module llmstable.cli train ...`).

One path from the command line to the run: the overrides are checked and composed once (Hydra's compose API,
llmstable.compose) into a validated config; rank 0 then checks the run directory, locks it and decides what to
resume from, once; `train(cfg)` runs with that decision. A sweep (`-m`) is Hydra's multirun, which composes each of
its jobs (once each) and runs it through the same `train`.

    llmstable train [overrides]                                 train (or resume) the run
    llmstable train [overrides] --cfg job                       print the composed config, run nothing
    llmstable train --config-name llmstable_schema --cfg job    print every key with its default
    llmstable train -m key=a,b ...                              a Hydra multirun sweep

Without run_dir=, a run gets a new folder runs/DATE_TIME. Exit codes: 0 done (or already complete); 2 a config,
data or checkpoint error (the message names the key or file and the fix), or run_dir in use by another run; 3 the
spike guard aborted (the last good checkpoint is intact); 4 the spike guard's replays point at the machine
(`stabilizer.spike_guard.max_sdc` silent-data-corruption suspects); 5 a checkpoint could not be written (disk full
or another OSError: the partial write was removed and the earlier checkpoints are intact); 75 stopped by a
preemption signal (SIGTERM, SIGUSR1: `train.preempt_signals`) or Ctrl-C, after writing a checkpoint: run the same
command to resume; 130 a second Ctrl-C stopped it at once. (llmstable.errors turns each exception into its code.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import llmstable  # noqa: F401  (sets the offline defaults before any Hugging Face import)
from llmstable.config import ConfigError, TrainLoopConfig
from llmstable.errors import UsageError, run_command
from llmstable.preemption import SignalFlag

SCHEMA = "llmstable_schema"


def train_command(args: list[str]) -> int:
    """The command; an error is its paragraph on stderr and its exit code (llmstable.errors), as for every command."""
    return run_command(_train, args)


def _train(args: list[str]) -> int:
    if any(a in ("-m", "--multirun") for a in args):
        shown = [a for a in args if a.split("=", 1)[0] in ("--cfg", "-c", "--info", "-i")]
        if shown:
            raise UsageError(f"{shown[0]} prints one run's composition and -m starts a sweep: drop -m (with one "
                             "value per key) to see a run's config, or drop the flag to run the sweep")
        return sweep_command(args)
    show, overrides = print_flags(args)
    if show == SCHEMA:
        return print_schema()
    # From here to the end of a run, a preemption signal only sets a flag (the defaults until the config is known).
    signals = SignalFlag(TrainLoopConfig().preempt_signals).install() if show is None else None
    try:
        from llmstable.compose import compose_config
        from llmstable.parallel.world import launched_world_size  # here: torch loads only for a run

        run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)
        if run_dir is None and launched_world_size() > 1 and show is None:
            raise ConfigError(["a distributed launch (WORLD_SIZE>1) needs run_dir=PATH, the same on every rank (a "
                               "timestamped default could differ between ranks)"])
        cfg = compose_config(overrides, run_dir=run_dir or default_run_dir())  # the one composition
        if signals is None:
            return print_config(cfg)
        signals = signals.narrow(cfg.train.preempt_signals)
        return run(cfg, signals)
    finally:
        if signals is not None:
            signals.uninstall()


def run(cfg, signals) -> int:
    """Claim the run directory (rank 0: checked, locked, the resume decided), log to it, and train."""
    from llmstable.parallel.world import World
    from llmstable.resume import RunDirectory
    from llmstable.trainer import train

    rank = int(os.environ.get("RANK", "0"))
    claim = RunDirectory(cfg, World()).claim() if rank == 0 else None  # (the lock stays held until the exit)
    with logging_to(Path(cfg.run_dir) if rank == 0 else None):
        summary = train(cfg, claim=claim, signals=signals)
    if rank == 0:
        print(json.dumps(summary, indent=2))
    return 0


def print_flags(args: list[str]) -> tuple[str | None, list[str]]:
    """(what to print instead of training: None, "job" or the schema, the overrides). Hydra's own flags besides
    these are for sweeps (-m); any other `-flag` is a usage error naming it."""
    overrides, show, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg in ("--cfg", "-c") and i + 1 < len(args):
            if args[i + 1] != "job":
                raise UsageError(f"--cfg {args[i + 1]}: only --cfg job (the composed config) is supported")
            show = show or "job"
            i += 2
            continue
        if arg in ("--config-name", "-cn") and i + 1 < len(args):
            if args[i + 1] != SCHEMA:
                raise UsageError(f"--config-name {args[i + 1]}: the configs are composed from configs/train.yaml; "
                                 f"--config-name {SCHEMA} --cfg job prints every key with its default")
            show = SCHEMA
            i += 2
            continue
        if arg.startswith("-"):
            raise UsageError(f"{arg}: not a flag of llmstable train (overrides are key=value; --cfg job prints the "
                             "config; -m runs a Hydra sweep)")
        overrides.append(arg)
        i += 1
    return show, overrides


def print_config(cfg) -> int:
    from omegaconf import OmegaConf

    from llmstable.config import to_dict

    print(OmegaConf.to_yaml(to_dict(cfg)), end="")
    return 0


def print_schema() -> int:
    """Every key of the typed schema with its default (the one source of defaults: llmstable.config)."""
    from omegaconf import OmegaConf

    from llmstable.config import TrainConfig, to_dict

    print(OmegaConf.to_yaml(to_dict(TrainConfig())), end="")
    return 0


def default_run_dir() -> str:
    return str(Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))


@contextlib.contextmanager
def logging_to(run_dir: Path | None):
    """llmstable's messages on stderr, and (rank 0) in RUN_DIR/train.log too, for the run's duration."""
    logger = logging.getLogger("llmstable")
    logger.setLevel(logging.INFO)
    handlers = []
    if not any(getattr(h, "llmstable_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        console.llmstable_console = True
        handlers.append(console)
    if run_dir is not None:
        file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        handlers.append(file)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def sweep_command(args: list[str]) -> int:
    """A Hydra multirun (`-m`, the compare command's runs): Hydra composes each job, which trains through `train`;
    the overrides are checked first, each problem named."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from llmstable.compose import CONFIG_DIR, check_overrides, register_resolvers

    problems, overrides = check_overrides(args)  # (schema keys become ++key=value, see llmstable.compose)
    if problems:
        raise ConfigError(problems)
    register_resolvers()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
    def job(raw: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        from llmstable.config import load_config
        from llmstable.errors import report
        from llmstable.trainer import SpikeAbort, train

        container = OmegaConf.to_container(raw, resolve=True)
        if container.get("run_dir") is None:
            container["run_dir"] = HydraConfig.get().runtime.output_dir
        try:
            return train(load_config(container))
        except SpikeAbort as err:  # in a sweep, an aborted arm is a result
            report(err)
            return json.loads((Path(container["run_dir"]) / "summary.json").read_text())

    sys.argv = ["llmstable train", *overrides]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises what a job raised: llmstable.errors reports it
    job()
    return 0

