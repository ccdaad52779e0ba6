"""`make gpu-check`: everything a GPU can tell that CI cannot, in one command on one GPU (about 10 minutes).

    python scripts/gpu_check.py [--skip-tests] [--model llama_1b] [--seq-len 1024] [--micro-batch 16]
                                [--steps 12] [--peak-tflops N] [--json gpu_check.json]

1. `pytest -m gpu` (`make test-gpu`, at most 4 minutes): its pass/fail counts.
2. A compile probe: every compiled optimizer kernel (SPAM, Stable-SPAM, S3, Fira) compiled on this GPU with
   inductor's defaults and with mix-order reduction off, each on copies; which ones fail, with the first line of the
   error. (The optimizers fall back to eager with a warning either way; this says why.)
3. Throughput at the given model, sequence length and micro-batch, bf16 autocast: tokens/s, model TFLOP/s and MFU
   for AdamW, SPAM and Stable-SPAM, each eager (model and optimizer) and compiled (model and optimizer kernels). The
   model is compiled once and reused by the three optimizers. MFU is against the chip's dense bf16 peak, named in
   the output (`--peak-tflops` for a chip the table does not know); the FLOP count is torchtitan's, embeddings
   excluded (6 x non-embedding parameters + 12 x layers x dim x sequence per token). Peak memory per contender.
4. The optimizer step alone at the model's shapes, against torch's fused AdamW in the same run.
5. Checkpoint: how long a save blocks the loop written in the loop and in the background (a snapshot to pinned CPU
   memory), the time until the background write is on disk, and a restore from disk.
Prints a table and writes gpu_check.json. Runs on a CPU too at toy sizes (`--device cpu --model tiny_1m
--seq-len 64 --micro-batch 4 --steps 3 --skip-tests`), which is how it is kept working without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmstable.optimizers.compile import fallen_back  # noqa: E402

# Dense bf16 peak per chip, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}
CONTENDERS = ("adamw", "spam", "stable_spam")
TEST_LIMIT_S = 240


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama_1b")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per contender (after 3 warm-up steps)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if the table lacks it")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device: run on a GPU machine, or pass --device cpu with toy sizes", file=sys.stderr)
        return 2
    result = {"machine": machine(device), "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {"json": str(args.json)}}
    result["peak_tflops"], result["peak_source"] = peak(device, args.peak_tflops)
    if not args.skip_tests:
        result["tests"] = gpu_tests()
    result["compile_probe"] = compile_probe(device)
    result["throughput"], result["optimizer_step"], result["checkpoint"] = model_benchmarks(args, device, result)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"wrote {args.json}")
    return 0


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def peak(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU: MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return tflops, f"{key} dense bf16 (datasheet)"
    return None, f"{name} is not in the table: pass --peak-tflops for MFU"


def gpu_tests() -> dict:
    began = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                             cwd=ROOT, capture_output=True, text=True, timeout=TEST_LIMIT_S)
        tail, code = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:], out.returncode
    except subprocess.TimeoutExpired:
        tail, code = f"timed out after {TEST_LIMIT_S} s", None
    failed = [] if code == 0 else [line for line in (out.stdout.splitlines() if code is not None else [])
                                   if line.startswith("FAILED")]
    return {"summary": tail, "exit": code, "failed": failed, "wall_s": round(time.perf_counter() - began, 1)}


def compile_probe(device: torch.device) -> dict:
    """Each compiled optimizer kernel, compiled on this device with inductor's defaults and with mix-order reduction
    off (the first suspect of the Triton failure seen on an H200): which compile, which fail and how."""
    from torch._inductor import config

    from llmstable.optimizers import fira, s3, spam, stable_spam
    from llmstable.optimizers.compile import _dynamo, _inductor

    g = torch.randn(2048, 512, device=device)
    m, v, p = torch.zeros_like(g), torch.zeros_like(g), torch.randn_like(g)
    stats, coef = torch.zeros(3, device=device), torch.rand(10, device=device) + 0.5
    scalar = torch.tensor(1e-3, device=device)
    cases = {
        "stable_spam.adaclip_threshold": (_inductor, stable_spam.adaclip_threshold, (g, stats, coef, 0.999)),
        "stable_spam.clipped_norm": (_inductor, stable_spam.clipped_norm, (g, scalar, scalar)),
        "stable_spam.stable_spam_apply_": (_inductor, stable_spam.stable_spam_apply_,
                                           (p, g, m, v, None, torch.rand(8, device=device), 0.999, 1e-8)),
        "spam.spam_update_": (_dynamo, spam.spam_update_, (p, g, m, v, scalar, scalar, 0.9, 0.999, 1e-6, 5000.0, True)),
        "s3.s3_update_": (_dynamo, s3.s3_update_, (p, g, m, v.abs() + 1e-3, scalar, 1 - scalar, 0.95, 2.0, 1e-8, False)),
        "fira.adam_step_": (_dynamo, fira.adam_step_, (p, g, m, v, torch.tensor([1.0, 0.0], device=device), 0.9, 0.999,
                                                       1e-8, True)),
    }
    out = {}
    for name, (compiler, fn, example) in cases.items():
        for label, patch in (("default", {}), ("mix_order_reduction_off", {"triton.mix_order_reduction": False})):
            if patch and not hasattr(config.triton, "mix_order_reduction"):
                continue
            try:
                torch._dynamo.reset()  # each setting compiles afresh (Dynamo would reuse the first graph)
                with config.patch(patch), warnings.catch_warnings():
                    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in example]
                    fresh = (lambda f, _: torch.compile(f, dynamic=False)) if compiler is _dynamo else compiler
                    fresh(fn, copies)(*copies)
                out[f"{name} [{label}]"] = "ok"
            except Exception as err:  # noqa: BLE001  (what failed is the finding)
                lines = [x for x in str(err).splitlines() if x.strip()]
                out[f"{name} [{label}]"] = f"FAILED {type(err).__name__}: {lines[0] if lines else ''}"[:300]
    return out


def model_benchmarks(args, device: torch.device, result: dict) -> tuple[dict, dict, dict]:
    from llmstable.compiled import CompiledForward
    from llmstable.compose import compose_config
    from llmstable.model.llama import build_model, llama_config

    cfg = compose_config([f"model={args.model}", f"data.seq_len={args.seq_len}"], run_dir="unused")
    vocab = cfg.model.vocab_size or 32000
    torch.manual_seed(0)
    model = build_model(llama_config(cfg.model, vocab), device)
    flops_per_token = model.flops_per_token(args.seq_len)
    compiled = CompiledForward(model)
    batch = torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1), device=device)
    throughput = {}
    for mode, forward in (("eager", model), ("compiled", compiled)):
        for name in CONTENDERS:
            throughput[f"{name}/{mode}"] = time_training(model, forward, name, mode == "compiled", batch, args, device,
                                                         flops_per_token, result["peak_tflops"])
    steps = time_optimizer_steps(model, device)
    ckpt_times = time_checkpoint(model, device)
    return throughput, steps, ckpt_times


def build(name: str, model: torch.nn.Module, device: torch.device, compiled: bool):
    from llmstable.compose import compose_config
    from llmstable.optimizers import build_optimizer

    extra = [] if name == "adamw" else [f"optimizer.compiled={str(compiled).lower()}"]
    cfg = compose_config([f"optimizer={name}", *extra], run_dir="unused")
    return build_optimizer(cfg.optimizer, model, device, 1000)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model, forward, name, compiled, batch, args, device, flops_per_token, peak_tflops) -> dict:
    from llmstable.losses import cross_entropy
    from llmstable.device import autocast_for

    optimizer = build(name, model, device, compiled)
    fallbacks = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast_for(device, "bf16"):
            loss = cross_entropy(forward(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the one host sync per step, as in the trainer

    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            step()
        first_steps_s = time.perf_counter() - began
        sync(device)
        began = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        elapsed = time.perf_counter() - began
        fallbacks = [str(w.message)[:200] for w in caught if "CompileFallbackWarning" in type(w.message).__name__]
    tokens_per_s = args.steps * batch.shape[0] * args.seq_len / elapsed
    tflops = tokens_per_s * flops_per_token / 1e12
    del optimizer
    return {"tokens_per_s": round(tokens_per_s), "model_tflops": round(tflops, 1),
            "mfu": round(tflops / peak_tflops, 4) if peak_tflops else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "warmup_s": round(first_steps_s, 1), "compile_fallbacks": fallbacks, "eager_kernels": fallen_back()}


def time_optimizer_steps(model, device: torch.device, reps: int = 5) -> dict:
    """The optimizer step alone at the model's shapes (random gradients), against fused AdamW in the same run."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    contenders = {"adamw_fused": lambda: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")}
    for name in ("spam", "stable_spam"):
        contenders[f"{name}_compiled"] = lambda n=name: build(n, model, device, True)
    out = {}
    for name, make in contenders.items():
        optimizer = make()
        for _ in range(2):
            optimizer.step()
        sync(device)
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            optimizer.step()
            sync(device)
            times.append(time.perf_counter() - began)
        out[name] = statistics.median(times)
        del optimizer
    base = out["adamw_fused"]
    return {**{k: {"s": round(v, 4), "vs_fused_adamw": round(v / base, 2)} for k, v in out.items()},
            "eager_kernels": fallen_back()}  # (kernels that failed to compile: the "compiled" rows ran them eagerly)


def time_checkpoint(model, device: torch.device) -> dict:
    from llmstable import checkpoint as ckpt
    from llmstable.checkpointer import Checkpointer
    from llmstable.parallel.engines import Engine
    from llmstable.parallel.world import World

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    engine = Engine(World(device=device), model, optimizer)
    out = {}
    with tempfile.TemporaryDirectory(prefix="llmstable-gpu-check-") as tmp:
        for mode in ("in_loop", "background"):
            writer = Checkpointer(Path(tmp) / mode, engine.world, keep=1, background=mode == "background",
                                  ring_size=0)
            began = time.perf_counter()
            path = writer.save(engine, 1, {"step": 1}, "gpu_check: true\n", good=False)
            out[f"save_{mode}_blocked_s"] = round(time.perf_counter() - began, 2)
            writer.wait()
            out[f"save_{mode}_written_s"] = round(time.perf_counter() - began, 2)
        out["checkpoint_gib"] = round(ckpt.checkpoint_bytes(path) / 2**30, 2)
        began = time.perf_counter()
        engine.load(path, {"format": "safetensors"})
        sync(device)
        out["restore_s"] = round(time.perf_counter() - began, 2)
    return out


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\n{m.get('gpu', m['device'])}, torch {m['torch']}, triton {m.get('triton')}, {result['date']}; "
          f"peak {result['peak_tflops']} TFLOP/s ({result['peak_source']})")
    if "tests" in result:
        print(f"make test-gpu: {result['tests']['summary']} ({result['tests']['wall_s']} s)")
        for line in result["tests"]["failed"]:
            print(f"  {line}")
    print("compile probe:")
    for name, outcome in result["compile_probe"].items():
        print(f"  {name:50s} {outcome}")
    print(f"{'contender':24s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>7s} {'vs AdamW':>9s} {'peak GiB':>9s}")
    for key, t in result["throughput"].items():
        base = result["throughput"][f"adamw/{key.split('/')[1]}"]["tokens_per_s"]
        mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "-"
        print(f"{key:24s} {t['tokens_per_s']:>10,} {t['model_tflops']:>8} {mfu:>7s} {t['tokens_per_s'] / base:>9.3f} "
              f"{t['peak_memory_gib'] if t['peak_memory_gib'] is not None else '-':>9}"
              + (f"  ({len(t['compile_fallbacks'])} compile fallback(s))" if t["compile_fallbacks"] else "")
              + (f"  (eager kernels: {', '.join(t['eager_kernels'])})" if t.get("eager_kernels") else ""))
    steps = {k: v for k, v in result["optimizer_step"].items() if k != "eager_kernels"}
    print("optimizer step alone: " + ", ".join(f"{k} {v['s']} s ({v['vs_fused_adamw']}x)" for k, v in steps.items())
          + (f"; eager kernels: {', '.join(result['optimizer_step']['eager_kernels'])}"
             if result["optimizer_step"].get("eager_kernels") else ""))
    print("checkpoint: " + ", ".join(f"{k} {v}" for k, v in result["checkpoint"].items()))


if __name__ == "__main__":
    sys.exit(main())
