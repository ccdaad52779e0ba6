"""Training-step throughput of llmstable's trainer against two baselines, measured in the same process.

    python scripts/bench.py [--model tiny_10m] [--seq-len 256] [--micro-batch 8] [--steps 10] [--rounds 3]

Contenders, all on the same model shape, batch and AdamW settings:
  llmstable  Trainer.train_step: data loader, forward/backward, clip, fused AdamW (built by build_trainer);
  bare       the same Llama module in a hand-written PyTorch loop on a pre-built batch;
  hf         transformers' LlamaForCausalLM with the same dims in the same plain loop.

Rounds interleave the contenders so that drifting machine load hits each of them alike; the median round counts.
MFU is model FLOPs per second (6N + attention, PaLM appendix B) over the peak of a large fp32 (CUDA: bf16)
matmul measured in this run. Prints a table and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmstable.compose import compose_config  # noqa: E402
from llmstable.runtime import autocast_for  # noqa: E402
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
    args = parser.parse_args()

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
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    trainer.log.close()


if __name__ == "__main__":
    main()
