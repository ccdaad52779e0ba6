"""`python -m llmstable.train [overrides]`: the train command as a module, for launchers that start one
(`torchrun -m llmstable.train`, `deepspeed --module llmstable.train`)."""

import sys

from llmstable.cli import train_command

if __name__ == "__main__":
    sys.exit(train_command([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
