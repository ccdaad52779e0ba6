"""What each parameter of a model is (its role), by name: the model says so (`Llama.param_roles`), so optimizers and
stabilizers that treat tensors by what they are (Muon's and Fira's matrices, SPAM's sparse groups, 4-bit weights,
Adam-mini's blocks) ask it instead of matching substrings of names. Torch-free."""

from __future__ import annotations

ROLES = ("embedding", "output", "query", "key", "value", "attention_output", "mlp", "norm")
BLOCK_ROLES = ("query", "key", "value", "attention_output", "mlp")  # the attention and MLP projection matrices


def param_roles(model) -> dict[str, str]:
    """The roles of `model`'s parameters, by their names in `model.named_parameters()`. A wrapper that keeps the
    model as `.module` (DDP) or `._orig_mod` (torch.compile) is looked through, its name prefix kept."""
    inner, prefix = model, ""
    while not hasattr(inner, "param_roles"):
        for attr in ("module", "_orig_mod"):
            if hasattr(inner, attr):
                inner, prefix = getattr(inner, attr), f"{prefix}{attr}."
                break
        else:
            raise TypeError(f"{type(model).__name__} does not say what its parameters are (no param_roles())")
    return {f"{prefix}{name}": role for name, role in inner.param_roles().items()}
