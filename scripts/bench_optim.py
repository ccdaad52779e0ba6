"""Optimizer step time at the parameter shapes of a model size, against torch.optim.AdamW, in one process.

    python scripts/bench_optim.py [--model llama_60m] [--steps 10] [--rounds 2] [--device auto] [--json out.json]
                                  [--only fira,s3_compiled,...]

Contenders: torch AdamW fused and foreach; llmstable SPAM, Stable-SPAM and S3, eager and compiled (torch.compile
of the per-tensor update); Fira, eager and compiled (attention and MLP matrices at rank 128, as the official 60M script); and
the short per-parameter reference versions from tests/optimizers/reference.py. Fira's SVD refresh (every
update_proj_gap = 200 steps) is timed apart and reported amortized per step.
Every contender gets its own copy of the same parameters and the same gradients; rounds interleave them, the
median round counts, and ratios are against fused AdamW measured in the same run. Compilation happens in the
warm-up steps and is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "optimizers"))

from llmstable.compose import compose_config  # noqa: E402
from llmstable.model import Llama, llama_config  # noqa: E402
from llmstable.optimizers import S3, SPAM, Fira, StableSPAM  # noqa: E402
from reference import ReferenceSPAM, ReferenceStableSPAM  # noqa: E402


def shapes_of(model_name: str) -> tuple[list[torch.Size], list[bool]]:
    """Parameter shapes, and whether each is an attention or MLP matrix (Fira's low-rank group)."""
    cfg = compose_config([f"model={model_name}"], run_dir="unused")
    with torch.device("meta"):
        model = Llama(llama_config(cfg.model, 32000))
    named = list(model.named_parameters())
    return [p.shape for _, p in named], [p.dim() == 2 and (".attention." in n or ".feed_forward." in n) for n, p in named]


def fira_groups(params: list, blocks: list[bool]) -> list[dict]:
    return [{"params": [p for p, b in zip(params, blocks) if not b]},
            {"params": [p for p, b in zip(params, blocks) if b], "rank": 128, "update_proj_gap": 200, "alpha": 0.25,
             "proj_type": "std"}]


def fira_refresh_s(opt: Fira, device) -> float:
    """Seconds of one full Fira step that also rebuilds every projector (an SVD per matrix)."""
    for state in opt.state.values():
        if "step" in state and ("ortho_left" in state or "ortho_right" in state):
            state["step"] = 0  # the next step refreshes (k mod 200 == 0)
    sync(device)
    t = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow per-parameter references")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default=None, help="comma-separated contenders to run (fused AdamW always runs)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    shapes, blocks = shapes_of(args.model)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in shapes]
    hp_spam = dict(lr=1e-3, weight_decay=0.1, warmup_steps=150, threshold=5000, DeltaT=500, grad_accu_steps=20)
    hp_stable = dict(lr=1e-3, weight_decay=0.1, total_T=10000, update_proj_gap=1000)
    factories = {
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
        "spam_eager": lambda ps: SPAM(ps, **hp_spam),
        "spam_compiled": lambda ps: SPAM(ps, compiled=True, **hp_spam),
        "stable_spam_eager": lambda ps: StableSPAM(ps, **hp_stable),
        "stable_spam_compiled": lambda ps: StableSPAM(ps, compiled=True, **hp_stable),
        "fira_eager": lambda ps: Fira(fira_groups(ps, blocks), lr=1e-2, weight_decay=0.1),
        "fira_compiled": lambda ps: Fira(fira_groups(ps, blocks), lr=1e-2, weight_decay=0.1, compiled=True),
        "s3_eager": lambda ps: S3(ps, lr=1e-3, weight_decay=0.1),
        "s3_compiled": lambda ps: S3(ps, lr=1e-3, weight_decay=0.1, compiled=True),
    }
    if not args.no_reference:
        factories["spam_reference"] = lambda ps: ReferenceSPAM([{"params": ps}], **hp_spam)
        factories["stable_spam_reference"] = lambda ps: ReferenceStableSPAM([{"params": ps}], **hp_stable)
    if args.only:
        keep = {"adamw_fused", *args.only.split(",")}
        factories = {name: make for name, make in factories.items() if name in keep}

    contenders, warmup_s = {}, {}
    for name, make in factories.items():
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        for p, g in zip(params, grads):
            p.grad = g
        opt = make(params)
        t = time.perf_counter()
        for _ in range(2):  # warm-up: state allocation, and compilation for the compiled ones
            opt.step()
        sync(device)
        warmup_s[name] = time.perf_counter() - t
        contenders[name] = opt

    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, opt in contenders.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)

    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    for name in ("fira_eager", "fira_compiled"):  # the SVD refresh, every 200 steps, amortized
        if name in contenders:
            refresh_ms = fira_refresh_s(contenders[name], device) * 1e3
            ms[f"{name}_with_refresh"] = ms[name] + (refresh_ms - ms[name]) / 200
            warmup_s[f"{name}_with_refresh"] = refresh_ms / 1e3
    base = ms["adamw_fused"]
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "model": args.model, "params": sum(s.numel() for s in shapes),
        "ms_per_step": ms, "ratio_vs_fused_adamw": {n: v / base for n, v in ms.items()}, "warmup_s": warmup_s,
    }
    print(f"device {report['device']}, {report['threads']} threads, {args.model} shapes "
          f"({report['params'] / 1e6:.1f}M parameters, {len(shapes)} tensors)")
    print(f"{'optimizer':<28} {'ms/step':>9} {'x fused AdamW':>14} {'warm-up s':>10}")
    for name in ms:
        print(f"{name:<28} {ms[name]:>9.1f} {ms[name] / base:>14.2f} {warmup_s[name]:>10.1f}")
    print("goals: spam_compiled <= 1.5x, stable_spam_compiled <= 2.0x fused AdamW")
    if any(name.endswith("_with_refresh") for name in ms):
        print("fira_*_with_refresh: the step that refreshes every projector (its seconds in the warm-up column) "
              "amortized over update_proj_gap = 200 steps")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
