"""Synthetic parameters and gradient streams with injected spikes, shared by the optimizer tests."""

import torch

SHAPES = [(48, 32), (32,), (4, 6, 8), (16, 48), (7,)]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def gradients(step, params, spike_every=29, spike_factor=1000.0):
    """Deterministic gradients; every spike_every steps, 5% of the entries are multiplied by spike_factor."""
    g = torch.Generator().manual_seed(7919 * step)
    out = []
    for p in params:
        x = torch.randn(p.shape, generator=g) * 0.01
        if step % spike_every == 0:
            x[torch.rand(p.shape, generator=g) < 0.05] *= spike_factor
        out.append(x)
    return out


def run(opt_factory, steps, groups_factory=lambda ps: [{"params": ps}], seed=0, start_state=None):
    """Parameters after every step; the optimizer and params are built fresh from a fixed torch seed."""
    torch.manual_seed(seed)
    params = make_params()
    opt = opt_factory(groups_factory(params))
    history = []
    for t in range(1, steps + 1):
        for p, grad in zip(params, gradients(t, params)):
            p.grad = grad
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt, params


def max_diff(a, b):
    return max((x - y).abs().max().item() for pa, pb in zip(a, b) for x, y in zip(pa, pb))
