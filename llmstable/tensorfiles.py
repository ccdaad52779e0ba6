"""Files of tensors that llmstable reads: what a file is before anything parses it, and reading it without running
code, with errors that say what the file is, why it is refused and what to do.

- **safetensors** (`train.init_from`, a checkpoint's `model.safetensors`): a length, a JSON header, raw bytes;
  nothing in it can run. A file given as safetensors that is something else (a `torch.save` zip, a bare pickle)
  is named as such before the safetensors parser sees it (it would only say "header too large").
- **torch's weights-only pickles** (`optimizer.pt`, `rng.pt`): read with `torch.load(weights_only=True)`, torch's
  restricted unpickler, which builds tensors and containers and refuses every other global. A refused file is
  reported with the global it asked for; torch's own advice (load it with `weights_only=False`, i.e. run what it
  holds) never reaches the user.
- **fit**: the shapes in a safetensors header against a model's, compared before any load, so that a mismatch
  names each tensor with both shapes instead of torch's `size mismatch` traceback.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path


class TensorFileError(ValueError):
    """A tensor file that is not what it should be, or asks for code to run; the message names it and the fix."""


CONVERT = ("convert it once where you trust it, for example python -c \"import torch; from safetensors.torch import "
           "save_file; sd = torch.load('{path}', weights_only=True); save_file({{k: v.contiguous() for k, v in "
           "sd.items()}}, '{path}.safetensors')\" (weights_only=True loads tensors and refuses code), or start from "
           "an llmstable run's export: llmstable export RUN OUT, then OUT/model.safetensors")


def kind(path: Path) -> str:
    """What the file is, from its first bytes: 'safetensors', 'torch zip', 'pickle', 'empty' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = f.seek(0, 2)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch zip"  # torch.save's format since 1.6: a zip archive whose data.pkl is a pickle
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"  # a pickle's PROTO opcode: the legacy torch.save format, or pickle.dump
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    return "unknown"


DESCRIBED = {"torch zip": "a PyTorch torch.save file (a zip archive holding a pickle)",
             "pickle": "a Python pickle (a legacy torch.save file, or pickle.dump)", "empty": "an empty file",
             "unknown": "not a safetensors file (its first bytes are not a safetensors header)"}


def read_safetensors(path: Path, what: str) -> dict:
    """Every tensor of a safetensors file. `what` names where the path came from, e.g. "train.init_from='x'"."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise TensorFileError(f"{what} does not exist: point it at a .safetensors file")
    found = kind(path)
    if found != "safetensors":
        why = (" llmstable never unpickles weights it is given: a pickle can run any code." if "pickle" in
               DESCRIBED[found] else "")
        raise TensorFileError(f"{what} is {DESCRIBED[found]}, not safetensors, so it is not read.{why} To use its "
                              f"weights, {CONVERT.format(path=path)}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise TensorFileError(f"{what} is not a readable safetensors file ({err}): it may be cut short or damaged; "
                              "copy it again, or export it again") from err


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """The name and shape of every tensor in a safetensors file, read from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def fit_problems(shapes: dict[str, list[int]], model_shapes: dict[str, list[int]]) -> list[str]:
    """Each tensor that does not fit: a name the model lacks, or a shape that differs (file vs model)."""
    problems = []
    for name, shape in shapes.items():
        if name not in model_shapes:
            problems.append(f"{name} {list(shape)} is not a parameter of this model")
        elif list(shape) != list(model_shapes[name]):
            problems.append(f"{name} is {list(shape)} in the file and {list(model_shapes[name])} in the model")
    return problems


def describe_misfit(problems: list[str], limit: int = 6) -> str:
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def load_weights_only(path: Path, fix: str):
    """torch.load(path, weights_only=True) with named errors: a file that asks for a global beyond tensors and
    containers (a payload) is refused with the global named; `fix` says what to do instead."""
    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" it asks for {asked.group(1)}" if asked else " it holds objects other than tensors and containers"
        raise TensorFileError(f"{path} is refused:{what}, which llmstable's weights-only reader does not load (a "
                              "pickle that names such objects can run code). llmstable never writes this: the file "
                              f"was replaced or made elsewhere. {fix}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise TensorFileError(f"{path} is not a readable torch file ({str(err).splitlines()[0][:200]}): it is "
                              f"damaged or not what its name says. {fix}") from None
