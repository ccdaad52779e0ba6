"""The `llmstable train` command, and `python -m llmstable.train [overrides]` for launchers that start a module
(`torchrun -m llmstable.train`, `deepspeed --module llmstable.train`).

Exit codes: 0 done (or already complete); 2 a config, data or checkpoint error (the message names the key or
file and the fix), or run_dir in use by another run; 3 the spike guard aborted (the last good checkpoint is intact);
5 a checkpoint could not be written (disk full or another OSError: the partial write was removed and the earlier
checkpoints are intact); 4 the spike guard's replays point at the machine (`stabilizer.spike_guard.max_sdc`
silent-data-corruption suspects); 75 stopped by a preemption signal (SIGTERM, SIGUSR1: `train.preempt_signals`)
or Ctrl-C, after writing a checkpoint: run the same command to resume; 130 a second Ctrl-C stopped it at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import llmstable  # noqa: F401  (sets the offline defaults before any Hugging Face import)
from llmstable.compose import CONFIG_DIR, compose_config, register_resolvers
from llmstable.config import ConfigError, load_config
from llmstable.errors import report, run_command
from llmstable.parallel.world import launched_world_size

EXIT_ERROR, EXIT_ABORTED, EXIT_HARDWARE, EXIT_WRITE_FAILED = 2, 3, 4, 5


def train_command(overrides: list[str]) -> int:
    if not any(o in ("-m", "--multirun") or o.startswith("-") for o in overrides):
        # Validate before Hydra starts, so that every problem is reported at once and no run directory is made
        # (or changed) for a run that cannot start. (Sweeps are validated per job, inside the app.)
        from llmstable.checkpoint import CheckpointError
        from llmstable.resume import preflight

        run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)
        try:
            cfg = compose_config(overrides, run_dir=run_dir or "unused-for-validation")
            if run_dir and int(os.environ.get("RANK", "0")) == 0:
                preflight(cfg)  # checks run_dir and locks it (for this process's lifetime) before Hydra writes there
        except (ConfigError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_ERROR
    import hydra
    from omegaconf import DictConfig, OmegaConf

    register_resolvers()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
    def hydra_train(raw: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        from llmstable.checkpoint import CheckpointError, CheckpointWriteError
        from llmstable.data import DataError
        from llmstable.preemption import EXIT_PREEMPTED, Preempted
        from llmstable.stabilizers.hooks import SuspectedHardwareFault
        from llmstable.trainer import SpikeAbort, train

        container = OmegaConf.to_container(raw, resolve=True)
        if container.get("run_dir") is None:
            container["run_dir"] = HydraConfig.get().runtime.output_dir
        try:
            summary = train(load_config(container))
        except CheckpointWriteError as err:
            report(err)  # (llmstable.errors: the paragraph, and the traceback under --debug)
            sys.exit(EXIT_WRITE_FAILED)
        except (ConfigError, DataError, CheckpointError) as err:
            report(err)
            sys.exit(EXIT_ERROR)
        except SuspectedHardwareFault as err:
            report(err)
            sys.exit(EXIT_HARDWARE)
        except Preempted as err:
            report(err)
            sys.exit(EXIT_PREEMPTED)
        except SpikeAbort as err:
            report(err)
            from hydra.types import RunMode

            if HydraConfig.get().mode == RunMode.MULTIRUN:  # in a sweep, an aborted arm is a result
                return json.loads((Path(container["run_dir"]) / "summary.json").read_text())
            sys.exit(EXIT_ABORTED)
        except Exception as err:  # noqa: BLE001  (anything else: one paragraph too, not Hydra's report of it)
            sys.exit(report(err))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary, indent=2))
        return summary

    if launched_world_size() > 1:
        if not any(o.startswith("run_dir=") for o in overrides):
            print("error: a distributed launch (WORLD_SIZE>1) needs run_dir=PATH, the same on every rank (Hydra's "
                  "timestamped default could differ between ranks)", file=sys.stderr)
            return 2
        if int(os.environ.get("RANK", "0")) != 0:  # one writer of Hydra's own files
            overrides = [*overrides, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    from llmstable.compose import check_overrides

    problems, overrides = check_overrides(overrides)  # (schema keys become ++key=value, see llmstable.compose)
    if problems:  # (a sweep's overrides, which were not composed above)
        print(f"error: {ConfigError(problems)}", file=sys.stderr)
        return EXIT_ERROR
    sys.argv = ["llmstable train", *overrides]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises what the run raised: llmstable.errors reports it
    hydra_train()
    return 0


if __name__ == "__main__":
    from llmstable.errors import debug_requested, set_debug

    debug, args = debug_requested([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    set_debug(debug)
    sys.exit(run_command(train_command, args))
