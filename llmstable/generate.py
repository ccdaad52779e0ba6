"""Short samples from a trained model."""

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


def sample_text(model: Llama, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0) -> str:
    """Decode prompt + max_new_tokens sampled tokens. Seeded, so the same model gives the same text."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def print_sample(engine, cfg, data, step: int) -> None:
    """The end-of-run sample (train.sample_tokens), printed by rank 0; every rank calls it."""
    model = sampling_model(engine, cfg, data.vocab_size)
    if model is not None:
        text = sample_text(model, data.tokenizer, "The", cfg.train.sample_tokens, seed=0)
        print(f"\n--- sample after {step} steps ---\n{text}\n---")
