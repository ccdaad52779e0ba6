"""Optimizer step time at the parameter shapes of a model size, against torch.optim.AdamW, in one process.

    python scripts/bench_optim.py [--model llama_60m] [--steps 10] [--rounds 2] [--device auto] [--json out.json]

Contenders: torch AdamW fused and foreach; llmstable SPAM and Stable-SPAM, eager and compiled (torch.compile of
the per-tensor update); and the short per-parameter reference versions from tests/optimizers/reference.py.
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
from llmstable.optimizers import SPAM, StableSPAM  # noqa: E402
from reference import ReferenceSPAM, ReferenceStableSPAM  # noqa: E402


def shapes_of(model_name: str) -> list[torch.Size]:
    cfg = compose_config([f"model={model_name}"], run_dir="unused")
    with torch.device("meta"):
        model = Llama(llama_config(cfg.model, 32000))
    return [p.shape for p in model.parameters()]


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
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    shapes = shapes_of(args.model)
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
    }
    if not args.no_reference:
        factories["spam_reference"] = lambda ps: ReferenceSPAM([{"params": ps}], **hp_spam)
        factories["stable_spam_reference"] = lambda ps: ReferenceStableSPAM([{"params": ps}], **hp_stable)

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
    base = ms["adamw_fused"]
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "model": args.model, "params": sum(s.numel() for s in shapes),
        "ms_per_step": ms, "ratio_vs_fused_adamw": {n: v / base for n, v in ms.items()}, "warmup_s": warmup_s,
    }
    print(f"device {report['device']}, {report['threads']} threads, {args.model} shapes "
          f"({report['params'] / 1e6:.1f}M parameters, {len(shapes)} tensors)")
    print(f"{'optimizer':<24} {'ms/step':>9} {'x fused AdamW':>14} {'warm-up s':>10}")
    for name in ms:
        print(f"{name:<24} {ms[name]:>9.1f} {ms[name] / base:>14.2f} {warmup_s[name]:>10.1f}")
    print("goals: spam_compiled <= 1.5x, stable_spam_compiled <= 2.0x fused AdamW")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
