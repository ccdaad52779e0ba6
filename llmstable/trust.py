"""Which checkpoints may be read with pickle: the trust model.

Checkpoint files come in two kinds:
- *data-only* files, read without running code: safetensors, JSON, YAML, and `torch.load(weights_only=True)`
  (torch's restricted unpickler, which builds tensors and plain containers and refuses every other global);
- *pickle-bearing* files: torch.distributed.checkpoint's `dcp/.metadata` (DCP reads it with `pickle.load`, and
  torch offers no restricted reader for it) and DeepSpeed's `.pt` files (which DeepSpeed reads with
  `weights_only=False`).

The manifest's checksums prove integrity (nothing changed since it was written), not authenticity (anyone can
recompute them). So every manifest llmstable writes also carries an HMAC-SHA256 over its file list, keyed with
a secret of the user who wrote it (`writer_key_file()`: `$LLMSTABLE_KEY_FILE`, else
`~/.config/llmstable/checkpoint.key`, created with mode 0600 on first use). A checkpoint in a pickle-bearing
format is loaded only if its manifest is signed with this key, i.e. it was written by llmstable under this
account (on a cluster, point LLMSTABLE_KEY_FILE at one file on the shared filesystem), or if the user opts in
with `--trust-checkpoint` (export, generate) or `resume_trust=true` (train). DeepSpeed's files are in addition
always read through `weights_only_loads()`, torch's restricted unpickler with the few DeepSpeed globals allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path


def writer_key_file() -> Path:
    explicit = os.environ.get("LLMSTABLE_KEY_FILE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "llmstable" / "checkpoint.key"


def _read_key(create: bool) -> bytes | None:
    path = writer_key_file()
    if not path.is_file() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: of two processes creating it at once, one writes and both read the same key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text.encode() if text else None


def _payload(manifest: dict) -> bytes:
    return json.dumps({"step": manifest.get("step"), "files": manifest.get("files")}, sort_keys=True).encode()


def sign(manifest: dict) -> str | None:
    """The writer's signature over a manifest's step and file list (None if no key can be made here)."""
    try:
        key = _read_key(create=True)
    except OSError:
        return None
    return hmac.new(key, _payload(manifest), hashlib.sha256).hexdigest() if key else None


def signed_here(manifest: dict) -> bool:
    """Whether the manifest carries a valid signature of this user's key."""
    signature = manifest.get("signature")
    key = _read_key(create=False)
    if not isinstance(signature, str) or key is None:
        return False
    return hmac.compare_digest(signature, hmac.new(key, _payload(manifest), hashlib.sha256).hexdigest())


def untrusted_message(path: Path, fmt: str, opt_in: str) -> str:
    return (
        f"{path} is a {fmt!r} checkpoint that was not written by llmstable under this account (its manifest "
        f"carries no signature of {writer_key_file()}). Its files are read with pickle, which can run arbitrary "
        f"code, so it is not loaded. If you trust whoever made it, pass {opt_in}; to share checkpoints safely, "
        "have their owner run `llmstable export` (safetensors, no code) and start from the export with "
        "train.init_from=EXPORT/model.safetensors"
    )


# DeepSpeed's checkpoint files hold, besides tensors and containers, a few objects of its own: its enums and
# loss-scaler state. These are allowed; anything else (a planted `os.system`, say) stops the load.
def _deepspeed_globals() -> list:
    allowed: list = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    import argparse

    allowed.append(argparse.Namespace)
    return allowed


@contextlib.contextmanager
def weights_only_loads():
    """Within this block, every `torch.load` (DeepSpeed's own included, which pass weights_only=False) uses torch's
    restricted unpickler, with DeepSpeed's few data classes allowed."""
    import torch

    original = torch.load

    def restricted(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return original(*args, **kwargs)

    torch.load = restricted
    try:
        yield
    finally:
        torch.load = original
