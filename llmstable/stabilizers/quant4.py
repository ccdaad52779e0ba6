"""4-bit weight training as in the Stable-SPAM INT4 experiments (Huang et al. 2025, arXiv 2502.17055, section 4):
the attention and MLP projection weights are fake-quantized to INT4 in the forward pass (asymmetric min-max per
group of `group_size` weights, round to nearest), gradients pass straight through to the full-precision master
weights, and the embeddings, the LM head and the norms stay in full precision. Optionally the activations entering
those layers are fake-quantized too (asymmetric min-max per token).

Why not torchao's QAT fake-quantizer, as first planned: with `IntxFakeQuantizeConfig(torch.int4, group_size,
is_symmetric=False)` (torchao 0.18) the grid is anchored at zero on [-8, 7] steps, so the largest entries of a
group clamp by up to several steps and lose their gradient, which is not the recipe's min-max grid (measured; see
tests/stabilizers/test_quant4.py). The function below is a handful of plain tensor ops, so it runs on CPU, on GPU
and under FSDP2 (which hands the forward the unsharded weight) all the same.

Groups are `group_size` consecutive entries of the row-major weight, as in the paper's code: along each row's
input dimension when the row length is a multiple of group_size, across row ends otherwise (llama_60m's MLP rows
hold 1376 = 5.375 groups of 256). group_size must divide every quantized weight's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstable.model.roles import BLOCK_ROLES, param_roles
from llmstable.stabilizers.hooks import Stabilizer


def fake_quantize(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min-max fake quantization over groups of group_size consecutive entries: q = round((x - min) / scale) in
    [0, 2^bits - 1], scale = (max - min) / (2^bits - 1), back to x's scale. Forward only (no gradient rule)."""
    levels = 2**bits - 1
    groups = x.reshape(-1, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(x.dtype).tiny)
    q = torch.clamp(torch.round((groups - lo) / scale), 0, levels)
    return (q * scale + lo).reshape(x.shape)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """quantized in the forward pass, identity gradient to x in the backward pass."""
    return x + (quantized - x).detach()


class QuantLinear(torch.nn.Linear):
    """A Linear whose weight (and optionally input) is fake-quantized in forward; its parameters and their names
    are the original Linear's, so checkpoints hold the full-precision master weights."""

    group_size: int = 256
    act_bits: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, fake_quantize(self.weight, 4, self.group_size))
        if self.act_bits is not None:
            x = straight_through(x, fake_quantize(x, self.act_bits, x.shape[-1]))
        return F.linear(x, w, self.bias)


def is_block_linear(module: torch.nn.Module, fqn: str, roles: dict[str, str]) -> bool:
    """The attention and MLP projections (by the model's parameter roles): what the recipe quantizes."""
    return type(module) is torch.nn.Linear and roles.get(f"{fqn}.weight") in BLOCK_ROLES


class Quant4(Stabilizer):
    """Hook `transform_model`: turns the attention/MLP linears into `QuantLinear` in place (same parameters)."""

    name = "quant4"

    def __init__(self, group_size: int = 256, act_bits: int | None = None):
        self.group_size, self.act_bits = group_size, act_bits

    def transform_model(self, model: torch.nn.Module) -> torch.nn.Module:
        roles = param_roles(model)
        for fqn, module in model.named_modules():
            if is_block_linear(module, fqn, roles):
                module.__class__ = QuantLinear  # keeps the Parameter objects, so nothing is re-registered
                module.group_size, module.act_bits = self.group_size, self.act_bits
        return model
