"""Short per-parameter reference versions of SPAM and Stable-SPAM, written straight from the arithmetic in the
papers' official code (see the docstrings of llmstable.optimizers.spam / stable_spam). Slow and plain on purpose:
the fast optimizers are checked against these."""

import math

import torch


class ReferenceSPAM:
    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, warmup_steps=150,
                 threshold=5000, DeltaT=500, grad_accu_steps=20):
        self.groups = [dict(g) for g in groups]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.N, self.thr, self.dT, self.acc = warmup_steps, threshold, DeltaT, grad_accu_steps
        self.t, self.c = 0, warmup_steps + 1
        self.state = {}
        for g in self.groups:  # exact-count masks, drawn like the official code
            for p in g["params"]:
                if "density" in g:
                    mask = torch.zeros(p.numel(), dtype=torch.bool)
                    mask[torch.randperm(p.numel())[: int(g["density"] * p.numel())]] = True
                    self.state[p] = {"mask": mask.view(p.shape)}

    @torch.no_grad()
    def step(self):
        self.t += 1
        t, b1, b2 = self.t, *self.betas
        s = 1.0 if self.c >= self.N else 1 - 0.99 * (1 + math.cos(math.pi * self.c / (self.N + 1))) / 2
        for g in self.groups:
            for p in g["params"]:
                st = self.state.setdefault(p, {})
                mask = st.get("mask")
                grad = p.grad[mask] if mask is not None else p.grad.clone()
                if "m" not in st or st["m"].shape != grad.shape:  # first step, or a redrawn mask
                    st["m"], st["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
                if self.dT and t % self.dT == 0:
                    st["m"], st["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
                st["k"] = st.get("k", 0) + 1
                if self.thr and t >= self.acc and (not self.dT or t % self.dT >= self.acc):
                    over = grad**2 > self.thr * st["v"]
                    grad[over] = grad[over].sign() * torch.sqrt(st["v"][over] * self.thr)
                st["m"] = b1 * st["m"] + (1 - b1) * grad
                st["v"] = b2 * st["v"] + (1 - b2) * grad * grad
                step = self.lr * math.sqrt(1 - b2 ** st["k"]) / (1 - b1 ** st["k"])
                delta = step * s * st["m"] / (st["v"].sqrt() + self.eps)
                if mask is not None:
                    p[mask] -= delta
                    p[mask] -= self.lr * g.get("weight_decay", self.wd) * p[mask]
                else:
                    p -= delta
                    p -= self.lr * g.get("weight_decay", self.wd) * p
        self.c += 1
        if self.dT and (self.t + 1) % self.dT == 0:
            for g in self.groups:
                for p in g["params"]:
                    if "density" in g:
                        self.state[p]["mask"] = torch.rand(p.shape) < g["density"]
            self.c = 0


class ReferenceStableSPAM:
    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, gamma1=0.7,
                 gamma2=0.9, gamma3=0.999, total_T=None, eta_min=0.5, update_proj_gap=1000):
        self.params = [p for g in groups for p in g["params"]]
        self.lr, self.betas, self.eps, self.wd, self.amsgrad = lr, betas, eps, weight_decay, amsgrad
        self.g1, self.g2, self.g3 = gamma1, gamma2, gamma3
        self.T, self.eta_min, self.gap = total_T, eta_min, update_proj_gap
        self.t = 0
        self.state = {}

    @torch.no_grad()
    def step(self):
        self.t += 1
        t = self.t
        s = 1.0 if self.T is None else self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * t / (self.T + 1))) / 2
        for p in self.params:
            st = self.state.setdefault(p, {"k": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                                           "vmax": torch.zeros_like(p), "mu": 0.0, "pn": 0.0, "qn": 0.0})
            p.mul_(1 - self.lr * self.wd)
            g = p.grad.clone()
            st["k"] += 1
            k = st["k"]
            peak = g.abs().max()
            st["mu"] = self.g3 * st["mu"] + (1 - self.g3) * peak
            tau = st["mu"] / (1 - self.g3**k)
            big = g.abs() > tau
            g[big] = g[big] / peak * tau
            n = torch.norm(g)
            a = self.g1 * s
            st["pn"] = a * st["pn"] + (1 - a) * n
            st["qn"] = self.g2 * st["qn"] + (1 - self.g2) * n**2
            c = (st["pn"] / (1 - a**k)) / (torch.sqrt(st["qn"] / (1 - self.g2**k)) + self.eps)
            if n > 0:
                g = g / n * c
            m, v = st["m"], st["v"]
            if self.gap and t % self.gap == 0:
                st["m"], st["v"], st["k"] = torch.zeros_like(p), torch.zeros_like(p), 1
            kb = st["k"]
            b1, b2 = self.betas[0] * s, self.betas[1]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.amsgrad:
                torch.max(st["vmax"], v, out=st["vmax"])
                v = st["vmax"]
            p.add_(m / (v.sqrt() / math.sqrt(1 - b2**kb) + self.eps), alpha=-self.lr / (1 - b1**kb))


class ReferenceS3:
    """SignSoftSGD (arXiv 2507.06464) in float64, from the algorithm as the paper describes it:
    m = b m + (1 - b) g; s = b s + (1 - b) |g|^p; Nesterov numerator b m + (1 - b) g over the denominator
    (b s + (1 - b) |g|^p)^(1/p) + eps (m over s^(1/p) + eps without Nesterov); decoupled weight decay first
    (in the parameter's dtype: a float64 decay factor alone drifts from any fp32 optimizer by 1e-6 in 200 steps)."""

    def __init__(self, groups, lr, beta=0.95, p=3.0, eps=1e-8, weight_decay=0.0, nesterov=True):
        self.params = [p for g in groups for p in g["params"]]
        self.lr, self.beta, self.p, self.eps, self.wd, self.nesterov = lr, beta, p, eps, weight_decay, nesterov
        self.state = {}

    @torch.no_grad()
    def step(self):
        b, pw = self.beta, self.p
        for param in self.params:
            g = param.grad.double()
            w = (param * (1 - self.lr * self.wd)).double()  # the decay in the parameter's dtype, like any optimizer
            st = self.state.setdefault(param, {"m": torch.zeros_like(g), "s": torch.zeros_like(g)})
            st["m"] = b * st["m"] + (1 - b) * g
            st["s"] = b * st["s"] + (1 - b) * g.abs() ** pw
            if self.nesterov:
                num, den = b * st["m"] + (1 - b) * g, (b * st["s"] + (1 - b) * g.abs() ** pw) ** (1 / pw)
            else:
                num, den = st["m"], st["s"] ** (1 / pw)
            w = w - self.lr * num / (den + self.eps)
            param.copy_(w.to(param.dtype))
