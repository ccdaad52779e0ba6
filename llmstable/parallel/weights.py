"""A checkpoint's model weights, whatever engine wrote it, into one plain (unsharded) model, in one process: what
`llmstable export` and `generate` read. Safetensors and JSON are data only; DCP and DeepSpeed files are read with
pickle, so those formats pass the trust check first (llmstable.trust)."""

from __future__ import annotations

from pathlib import Path

import torch

from llmstable import checkpoint as ckpt


def read_weights(path: Path, model: torch.nn.Module, trusted: bool = False) -> None:
    """Load checkpoint `path`'s weights into `model`. trusted=True (--trust-checkpoint) loads a DCP or DeepSpeed
    checkpoint written under another account."""
    problem = ckpt.verify(path)
    if problem is not None:
        raise ckpt.CheckpointError(f"cannot load checkpoint {path}: {problem}")
    ckpt.check_trusted(path, trusted, "--trust-checkpoint")
    fmt = ckpt.state_format(ckpt.read_state(path))
    if fmt == "safetensors":
        from llmstable.parallel.engines import load_safetensors

        load_safetensors(path, model, None)
    elif fmt == "dcp":
        from llmstable.parallel.engines import load_dcp

        load_dcp(path, model, None)
    else:  # deepspeed (verify refused any other format)
        from llmstable.parallel.deepspeed import read_deepspeed_weights

        weights = read_deepspeed_weights(path)
        own = model.state_dict()
        missing = [k for k in own if k not in weights and not (k == "lm_head.weight" and "tok_embeddings.weight" in weights)]
        if missing:
            raise ckpt.CheckpointError(f"{path / 'deepspeed'} lacks weights {missing[:5]}: written with another model?")
        model.load_state_dict({k: weights[k] for k in own if k in weights}, strict=False)
