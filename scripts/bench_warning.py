"""What the spike early warning costs (part of `make bench`): the paper's predictor (one Hessian-vector product,
arXiv 2506.04805) and the per-block proxy, against a plain forward and backward of the same batch.

    python scripts/bench_warning.py [--model tiny_10m] [--seq-len 256] [--batch 8] [--rounds 3]

The predictor runs every `curvature_interval` steps, so its cost per step is (predictor step - plain step) /
interval; the proxy runs at logged steps. Interleaved rounds, median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmstable.compose import CONFIG_DIR
from llmstable.config import ModelConfig
from llmstable.model import build_model, llama_config
from llmstable.stabilizers.warning import adam_preconditioner, block_stale_fractions, directional_curvature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_10m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args()
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{ns.model}.yaml"))
    fields = {k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__}
    model = build_model(llama_config(ModelConfig(**fields), 4096))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.cfg.vocab_size, (ns.batch, ns.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def loss_of():
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    for _ in range(2):  # Adam state to precondition with
        opt.zero_grad()
        loss_of().backward()
        opt.step()

    def plain():
        opt.zero_grad()
        loss_of().backward()

    def predictor():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        opt.zero_grad()
        with sdpa_kernel([SDPBackend.MATH]):  # (as the warning runs it: the math kernel has a second derivative)
            loss = loss_of()
            float(directional_curvature(loss, *adam_preconditioner(opt)))
        loss.backward()

    def proxy():
        opt.zero_grad()
        loss_of().backward()
        block_stale_fractions(model, opt, 0.01).tolist()

    times = {"plain forward + backward": [], "with the predictor (HVP)": [], "with the proxy": []}
    for _ in range(ns.rounds):
        for (name, fn) in zip(times, (plain, predictor, proxy)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain forward + backward"])
    print(f"{ns.model}, seq {ns.seq_len}, batch {ns.batch}, fp32, {torch.get_num_threads()} threads, "
          f"median of {ns.rounds}")
    print("| step | ms | x plain |\n| --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
