"""Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon; Liu et al. 2025, arXiv 2502.16982) as its authors
prescribe it for a transformer: `torch.optim.Muon` on the 2-D hidden matrices (attention and MLP), AdamW on
everything else (token embeddings, LM head, norms).

`MuonWithAdamW` is one `torch.optim.Optimizer` over both: its `param_groups` are the two inner optimizers' group
dicts (the same objects, so setting `group["lr"]` reaches them) and its `state` is one dict both write into, so
`state_dict()` / `load_state_dict()` round-trip the whole state in torch's own format and a resume is exact.

One deviation, on request: `ns_dtype="fp32"` runs the Newton-Schulz iteration in float32 instead of torch's
bfloat16. On CPUs without bfloat16 units a bf16 matmul is about 9x slower than fp32 (measured on the CI machine),
which made Muon's step cost more than the model's forward and backward at tiny_1m. `auto` is fp32 on CPU, bf16
(torch's own code path) elsewhere.
"""

from __future__ import annotations

import contextlib

import torch
import torch.optim._muon as torch_muon
from torch.optim import Optimizer


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration, in float32: X <- aX + (bA + cA^2)X with A = XX^T, on
    the wide orientation, after scaling X to Frobenius norm 1 (so its spectral norm is at most 1)."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def _newton_schulz_in(dtype: str):
    """Within the block, torch's Muon orthogonalizes with newton_schulz_fp32 (dtype "fp32"); "bf16" is torch's own."""
    if dtype != "fp32":
        yield
        return
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = newton_schulz_fp32  # (looked up at call time by torch's muon())
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original


class MuonWithAdamW(Optimizer):
    """Muon on `muon_params` (2-D only), AdamW on `adamw_groups`; one LR schedule drives both.

    Muon's algorithm lines (torch.optim.Muon): momentum as an EMA, B = mu*B + (1 - mu)*g (torch's lerp), the
    Nesterov look-ahead (1 - mu)*g + mu*B, five quintic
    Newton-Schulz iterations in bfloat16 towards the nearest semi-orthogonal matrix, decoupled weight decay, and
    the LR scaled by the matrix shape (`adjust_lr_fn`: "match_rms_adamw" scales the update to AdamW's RMS,
    0.2*sqrt(max(A, B)), so the two parts share one LR, as Liu et al. do; "original" is Keller Jordan's
    sqrt(max(1, A/B)), which wants a Muon LR about 10-50x AdamW's).
    """

    def __init__(self, muon_params: list, adamw_groups: list[dict], lr: float = 1e-3, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str = "match_rms_adamw",
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 fused: bool | None = None, ns_dtype: str = "bf16"):
        if ns_dtype not in ("bf16", "fp32"):
            raise ValueError(f"ns_dtype={ns_dtype!r} must be bf16 (torch's) or fp32")
        self.ns_dtype = ns_dtype
        muon_params = list(muon_params)
        adamw_groups = [g for g in adamw_groups if len(g["params"])]
        # Either part may be empty (a model of matrices only, or a test of one side); torch refuses empty optimizers.
        self.muon = torch.optim.Muon(muon_params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                     adjust_lr_fn=adjust_lr_fn, weight_decay=weight_decay) if muon_params else None
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       fused=fused) if adamw_groups else None
        groups = []
        for inner, is_muon in ((self.muon, True), (self.adamw, False)):
            for group in inner.param_groups if inner is not None else ():
                group["muon"] = is_muon
                groups.append(group)
        # The outer optimizer holds the inner optimizers' group dicts themselves (add_param_group keeps the dict).
        super().__init__(groups, {})
        self._link()

    def _link(self) -> None:
        """Point both inner optimizers at the outer groups and state (again after load_state_dict, which makes new
        ones)."""
        for inner, is_muon in ((self.muon, True), (self.adamw, False)):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["muon"] == is_muon]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.muon is not None:
            with _newton_schulz_in(self.ns_dtype):
                self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss
