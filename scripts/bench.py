"""Training-step throughput of llmstable's trainer against two baselines, in process and end to end.

    python scripts/bench.py [--model tiny_10m] [--seq-len 256] [--micro-batch 8] [--steps 10] [--rounds 3]
                            [--e2e-steps 40] [--e2e-rounds 3] [--no-e2e]

Contenders, all on the same model shape, batch and AdamW settings:
  llmstable  Trainer.train_step: data loader, forward/backward, clip, fused AdamW (built by build_trainer);
  bare       the same Llama module in a hand-written PyTorch loop on a pre-built batch;
  hf         transformers' LlamaForCausalLM with the same dims in the same plain loop.

In process, rounds interleave the contenders so that drifting machine load hits each of them alike; the median
round counts. End to end, each contender is its own process (the order rotating between rounds; each round's
ratios are paired, and their median counts), started as a user would: `llmstable train` through
the CLI (the default log interval of 10, with its leading indicators, the progress bar and the metrics rows; no
evaluation or checkpoint before the end), against `python scripts/bench.py --loop bare|hf` (the plain loops,
with one host sync per step for the loss, as the trainer has). Throughput counts the steps after the first 10
(compile, allocator and cache warm-up), from the trainer's own metrics rows and the loops' own clocks; the
median of the rounds counts. MFU is model FLOPs per second (6N + attention, PaLM appendix B) over the peak of a
large fp32 (CUDA: bf16) matmul measured in this run. Prints tables and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmstable.compose import compose_config  # noqa: E402
from llmstable.device import autocast_for  # noqa: E402
from llmstable.trainer import build_trainer  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_model(model_cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.dim, intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.n_layers, num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.kv_heads, max_position_embeddings=model_cfg.max_seq_len,
        tie_word_embeddings=model_cfg.tie_embeddings, attn_implementation="sdpa",
    ))
    return hf


def plain_step_fn(forward, params, batch, accum, device, precision):
    """A minimal loop: the baseline the trainer is held to."""
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        for x in batch.chunk(accum):
            with autocast_for(device, precision):
                logits = forward(x[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


WARMUP_STEPS = 10  # end to end: the first metrics row (10 steps) is warm-up


def loop_main(args) -> None:
    """`--loop bare|hf`: a plain loop in this process, as a user would write it; prints its tokens/s as JSON."""
    from omegaconf import OmegaConf

    from llmstable.config import load_config
    from llmstable.model import build_model, llama_config

    raw_model = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{args.model}.yaml"))
    cfg = load_config({"run_dir": "unused", "model": raw_model, "data": {"seq_len": args.seq_len}})
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    model_cfg = llama_config(cfg.model, 4096)
    torch.manual_seed(0)
    if args.loop == "bare":
        module = build_model(model_cfg, device)
        forward = module
    else:
        module = hf_model(model_cfg).to(device)
        forward = lambda x: module(x).logits  # noqa: E731
    params = list(module.parameters())
    batch = torch.randint(0, model_cfg.vocab_size, (args.micro_batch * args.accum, args.seq_len + 1), device=device)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)
    t_start = None
    for step in range(args.e2e_steps):
        if step == WARMUP_STEPS:
            t_start = time.perf_counter()
        total = torch.zeros((), device=device)
        for x in batch.chunk(args.accum):
            with autocast_for(device, "auto"):
                logits = forward(x[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            (loss / args.accum).backward()
            total += loss.detach() / args.accum
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.stack([total, norm]).tolist()  # the one host sync per step, as in the trainer
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    elapsed = time.perf_counter() - t_start
    tokens = (args.e2e_steps - WARMUP_STEPS) * args.micro_batch * args.accum * args.seq_len
    print(json.dumps({"tokens_per_sec": tokens / elapsed}))


def llmstable_e2e(args, run_dir: Path) -> float:
    """`llmstable train` through the CLI; tokens/s over the metrics rows after the first."""
    command = [sys.executable, "-m", "llmstable.cli", "train", f"model={args.model}", f"data.seq_len={args.seq_len}",
               "data.tokenizer.vocab_size=4096", f"train.micro_batch_size={args.micro_batch}",
               f"train.global_batch_size={args.micro_batch * args.accum}", "train.budget_tokens=null",
               f"train.max_steps={args.e2e_steps}", "train.eval_interval=1000000", "train.checkpoint_interval=0",
               "train.sample_tokens=0", "train.plot=false", f"train.device={args.device}", f"run_dir={run_dir}",
               "resume=never", "run_dir_overwrite=true"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/tokens_per_sec" in r and r["step"] > WARMUP_STEPS]
    step_tokens = args.micro_batch * args.accum * args.seq_len
    tokens = seconds = 0.0
    last_step = WARMUP_STEPS
    for r in rows:  # each row times the steps since the previous row
        window = (r["step"] - last_step) * step_tokens
        tokens, seconds, last_step = tokens + window, seconds + window / r["perf/tokens_per_sec"], r["step"]
    return tokens / seconds


def end_to_end(args) -> dict:
    """Each contender in its own process, one after the other in each round, the order rotating between rounds so
    that no contender always runs first or last. The machine's speed drifts by several percent between minutes, so
    the ratios are taken within each round (paired) and their median counts; the median tokens/s are reported too."""
    names = ["llmstable", "bare", "hf"]
    runs = {name: [] for name in names}
    scratch = Path(tempfile.mkdtemp(prefix="llmstable-bench-e2e-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(args.e2e_rounds):
        for name in names[round_ % 3:] + names[:round_ % 3]:
            if name == "llmstable":
                runs[name].append(llmstable_e2e(args, scratch / "run"))
                continue
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--loop", name, "--model", args.model,
                                  "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                                  "--accum", str(args.accum), "--e2e-steps", str(args.e2e_steps),
                                  "--device", args.device], check=True, capture_output=True, text=True, env=env)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_sec"])
    paired = {other: [a / b for a, b in zip(runs["llmstable"], runs[other])] for other in ("bare", "hf")}
    return {"tokens_per_sec": {name: statistics.median(v) for name, v in runs.items()}, "rounds": runs,
            "round_ratios": paired,
            "ratio_llmstable_vs_bare": statistics.median(paired["bare"]),
            "ratio_llmstable_vs_hf": statistics.median(paired["hf"])}


ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_10m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--e2e-steps", type=int, default=40, help="end to end: steps per run (the first 10 warm up)")
    parser.add_argument("--e2e-rounds", type=int, default=3)
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end comparison")
    parser.add_argument("--loop", choices=("bare", "hf"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        return loop_main(args)

    run_dir = Path(tempfile.mkdtemp(prefix="llmstable-bench-"))
    cfg = compose_config([
        f"model={args.model}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * args.accum}", "train.budget_tokens=null", "train.max_steps=1000",
        "train.progress=false", f"train.device={args.device}",
    ], run_dir=run_dir)
    trainer = build_trainer(cfg)
    device, precision = trainer.device, cfg.train.precision
    model_cfg = trainer.model.cfg
    torch.manual_seed(0)
    batch = torch.randint(0, model_cfg.vocab_size, (args.micro_batch * args.accum, args.seq_len + 1), device=device)

    from llmstable.model import build_model

    bare = build_model(model_cfg, device)
    hf = hf_model(model_cfg).to(device)
    contenders = {
        "llmstable": lambda: trainer.train_step(1e-4),
        "bare": plain_step_fn(bare, list(bare.parameters()), batch, args.accum, device, precision),
        "hf": plain_step_fn(lambda x: hf(x).logits, list(hf.parameters()), batch, args.accum, device, precision),
    }
    for step in contenders.values():  # warm-up: allocator, kernels, optimizer state
        step(), step()
    sync(device)
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)

    tokens_per_step = args.micro_batch * args.accum * args.seq_len
    flops_per_token = trainer.model.flops_per_token(args.seq_len)
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, peak_dtype)
    results = {}
    for name, ts in times.items():
        step_s = statistics.median(ts)
        tps = tokens_per_step / step_s
        results[name] = {"step_s": step_s, "tokens_per_sec": tps, "mfu": tps * flops_per_token / peak}
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "model": args.model, "params": trainer.model.num_params(),
        "seq_len": args.seq_len, "batch": f"{args.micro_batch}x{args.accum}", "matmul_peak_flops": peak,
        "results": results,
        "ratio_llmstable_vs_bare": results["llmstable"]["tokens_per_sec"] / results["bare"]["tokens_per_sec"],
        "ratio_llmstable_vs_hf": results["llmstable"]["tokens_per_sec"] / results["hf"]["tokens_per_sec"],
    }
    print(f"device {report['device']}, {report['threads']} threads, model {args.model} ({report['params'] / 1e6:.2f}M), "
          f"seq {args.seq_len}, batch {report['batch']}, matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'contender':<10} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_sec']:>10.0f} {r['mfu'] * 100:>6.1f}%")
    print(f"llmstable / bare = {report['ratio_llmstable_vs_bare']:.3f}   (goal >= 0.97)")
    print(f"llmstable / hf   = {report['ratio_llmstable_vs_hf']:.3f}   (goal >= 1.00)")
    trainer.log.close()
    if not args.no_e2e:
        e2e = end_to_end(args)
        report["end_to_end"] = e2e
        print(f"\nend to end ({args.e2e_steps} steps per run, the first {WARMUP_STEPS} excluded, {args.e2e_rounds} "
              "rounds, each contender its own process; ratios: the median of each round's ratio):")
        print(f"{'contender':<10} {'tokens/s':>10}")
        for name, tps in e2e["tokens_per_sec"].items():
            print(f"{name:<10} {tps:>10.0f}")
        for other, goal in (("bare", "0.97"), ("hf", "1.00")):
            spread = ", ".join(f"{r:.3f}" for r in e2e["round_ratios"][other])
            ratio = e2e[f"ratio_llmstable_vs_{other}"]
            print(f"llmstable / {other:<4} = {ratio:.3f}   (goal >= {goal}; rounds: {spread})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
