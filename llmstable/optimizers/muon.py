"""Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon; Liu et al. 2025, arXiv 2502.16982) as its authors
prescribe it for a transformer: `torch.optim.Muon` on the 2-D hidden matrices (attention and MLP), AdamW on
everything else (token embeddings, LM head, norms).

`MuonWithAdamW` is one `torch.optim.Optimizer` over both: its `param_groups` are the two inner optimizers' group
dicts (the same objects, so setting `group["lr"]` reaches them) and its `state` is one dict both write into, so
`state_dict()` / `load_state_dict()` round-trip the whole state in torch's own format and a resume is exact.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class MuonWithAdamW(Optimizer):
    """Muon on `muon_params` (2-D only), AdamW on `adamw_groups`; one LR schedule drives both.

    Muon's algorithm lines (torch.optim.Muon): momentum B = mu*B + g, Nesterov g + mu*B, five quintic
    Newton-Schulz iterations in bfloat16 towards the nearest semi-orthogonal matrix, decoupled weight decay, and
    the LR scaled by the matrix shape (`adjust_lr_fn`: "match_rms_adamw" scales the update to AdamW's RMS,
    0.2*sqrt(max(A, B)), so the two parts share one LR, as Liu et al. do; "original" is Keller Jordan's
    sqrt(max(1, A/B)), which wants a Muon LR about 10-50x AdamW's).
    """

    def __init__(self, muon_params: list, adamw_groups: list[dict], lr: float = 1e-3, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str = "match_rms_adamw",
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 fused: bool | None = None):
        self.muon = torch.optim.Muon(muon_params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                     adjust_lr_fn=adjust_lr_fn, weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused)
        for group in self.muon.param_groups:
            group["muon"] = True
        for group in self.adamw.param_groups:
            group["muon"] = False
        # The outer optimizer holds the inner optimizers' group dicts themselves (add_param_group keeps the dict).
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point both inner optimizers at the outer groups and state (again after load_state_dict, which makes new
        ones)."""
        self.muon.param_groups = [g for g in self.param_groups if g["muon"]]
        self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self.muon.state = self.state
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss
