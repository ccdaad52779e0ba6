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
import functools
import inspect
import warnings

import torch
import torch.optim._muon as torch_muon
from torch.optim import Optimizer


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float, use_addmm: bool = True) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration, in float32: X <- aX + (bA + cA^2)X with A = XX^T, on
    the wide orientation, after scaling X to Frobenius norm 1 (so its spectral norm is at most 1). `use_addmm`
    (torch's newer signature) is accepted and ignored: the polynomial is always evaluated with addmm, the same
    arithmetic as torch's `use_addmm=True` path up to rounding."""
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


NS_PARAMETERS = ["grad", "ns_coefficients", "ns_steps", "eps"]  # torch 2.11-2.13; newer ones add use_addmm


@functools.cache
def fp32_newton_schulz_fits() -> bool:
    """Whether this torch's Muon calls a private `_zeropower_via_newtonschulz` that newton_schulz_fp32 can stand in
    for (same parameters, looked up at call time); if not, Muon runs torch's own bf16 iteration, with a warning."""
    fn = getattr(torch_muon, "_zeropower_via_newtonschulz", None)
    try:
        params = list(inspect.signature(fn).parameters) if fn is not None else []
    except (TypeError, ValueError):
        params = []
    fits = params[:4] == NS_PARAMETERS and set(params[4:]) <= {"use_addmm"}
    if not fits:
        warnings.warn(f"optimizer.ns_dtype=fp32 cannot be honoured on torch {torch.__version__}: its Muon no longer "
                      "calls torch.optim._muon._zeropower_via_newtonschulz(grad, ns_coefficients, ns_steps, eps), "
                      "so Muon runs torch's own bfloat16 Newton-Schulz iteration (slower on CPUs without bf16 units). "
                      "Set optimizer.ns_dtype=bf16 to silence this", RuntimeWarning, stacklevel=2)
    return fits


@contextlib.contextmanager
def _newton_schulz_in(dtype: str):
    """Within the block, torch's Muon orthogonalizes with newton_schulz_fp32 (dtype "fp32", where this torch allows
    it); "bf16" is torch's own."""
    if dtype != "fp32" or not fp32_newton_schulz_fits():
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
