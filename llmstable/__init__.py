"""llmstable: stable LLM pre-training."""

import os

# Offline by default: nothing reaches the network unless the user asks for it by setting these to 0 (or wandb's
# mode to offline/online in the logging config). setdefault keeps whatever the user already exported.
# These must be set before huggingface_hub / datasets are imported, which read them at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

__version__ = "0.1.0"
