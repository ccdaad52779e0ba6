"""Short samples from a trained model, from the distribution it was trained for: the softmax of its logits, or,
for a StableMax run (`loss=stablemax`), the StableMax distribution s(x) / sum s(x) of the same logits."""

from __future__ import annotations

import dataclasses

import torch

from llmstable.model import Llama


def sampling_model(engine, cfg, vocab_size: int) -> torch.nn.Module | None:
    """On rank 0, a model to sample from: the trained one where the engine holds it whole, else a whole copy of the
    sharded one (a collective every rank calls); None on other ranks."""
    if engine.holds_whole_model:
        return engine.model if engine.world.is_main else None
    weights = engine.full_state_dict()
    if weights is None:
        return None
    from llmstable.stabilizers import build_model_and_stabilizers

    plain = dataclasses.replace(cfg, stabilizer=dataclasses.replace(cfg.stabilizer, quant4=None))
    model, _ = build_model_and_stabilizers(plain, vocab_size)
    model.load_state_dict(weights)
    return model.to(engine.world.device)


@torch.no_grad()
def stablemax_generate(model: Llama, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Like `Llama.generate`, sampling from StableMax instead of the softmax: p = s(x / T) / sum s(x / T) over the
    top_k scores (s is increasing, so the top k are the same as the softmax's); temperature <= 0 is greedy."""
    from llmstable.stabilizers.losses import stablemax_probs

    for _ in range(max_new_tokens):
        scores = model(idx[:, -model.cfg.max_seq_len:])[:, -1, :].float()  # (B, V)
        if temperature <= 0:
            next_id = scores.argmax(dim=-1, keepdim=True)
        else:
            probs = stablemax_probs(scores / temperature)
            if top_k is not None:
                kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
                probs = probs.masked_fill(scores < kth, 0.0)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def sample_text(model: Llama, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0, loss: str = "cross_entropy") -> str:
    """Decode prompt + max_new_tokens sampled tokens. Seeded, so the same model gives the same text. `loss` is the
    run's loss name: a StableMax run samples from StableMax."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    sample = stablemax_generate if loss == "stablemax" else type(model).generate
    out = sample(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def print_sample(engine, cfg, data, step: int) -> None:
    """The end-of-run sample (train.sample_tokens), printed by rank 0; every rank calls it."""
    model = sampling_model(engine, cfg, data.vocab_size)
    if model is not None:
        text = sample_text(model, data.tokenizer, "The", cfg.train.sample_tokens, seed=0, loss=cfg.loss.name)
        print(f"\n--- sample after {step} steps ---\n{text}\n---")
