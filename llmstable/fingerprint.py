"""A short hash of tensors' bytes: how a study checks that its arms start from the same weights (`init_hash`) and
read the same first batch (`first_batch_hash`)."""

from __future__ import annotations

import hashlib

import torch


def fingerprint(tensors) -> str:
    """The first 16 hex digits of the SHA-256 of the tensors' bytes, in order."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
