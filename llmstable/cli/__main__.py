"""`python -m llmstable.cli COMMAND ...`: what the `llmstable` script runs, for launchers that start a module
(`torchrun -m llmstable.cli train ...`, `deepspeed --module llmstable.cli train ...`)."""

import sys

from llmstable.cli import main

sys.exit(main())
