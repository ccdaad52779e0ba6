"""Short samples from a trained model, from the distribution it was trained for: the softmax of its logits, or,
for a run whose loss defines another distribution (its schema's `samples_from`: StableMax's s(x) / sum s(x) for
`loss=stablemax`), that distribution of the same logits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from llmstable.model import Llama


def sampling_model(engine, cfg, vocab_size: int) -> torch.nn.Module | None:
    """On rank 0, a model to sample from: the trained one where the engine holds it whole, else a whole copy of the
    sharded one (a collective every rank calls); None on other ranks."""
    if engine.traits.holds_whole_model:
        return engine.model if engine.world.is_main else None
    weights = engine.full_state_dict()
    if weights is None:
        return None
    from llmstable.stabilizers import build_model_and_stabilizers

    plain = dataclasses.replace(cfg, stabilizer=dataclasses.replace(cfg.stabilizer, quant4=None))
    model, _ = build_model_and_stabilizers(plain, vocab_size)
    model.load_state_dict(weights)
    return model.to(engine.world.device)


class GenerateError(ValueError):
    """Sampling arguments that cannot run; the message names the flag, the value and the fix."""


def check_sampling(temperature: float, top_k: int | None, max_new_tokens: int) -> None:
    """Refuse what sampling cannot mean, every problem at once: a temperature that is not a finite number >= 0
    (0 is greedy), a top-k below 1, a negative number of tokens."""
    problems = []
    if not math.isfinite(temperature) or temperature < 0:
        problems.append(f"--temperature {temperature} must be a finite number >= 0 (0 picks the most likely token, "
                        "1 samples the model's distribution as it is), e.g. --temperature 0.8")
    if top_k is not None and top_k < 1:
        problems.append(f"--top-k {top_k} must be >= 1 (sample among the k most likely tokens); to sample among all "
                        "of them, pass a k as large as the vocabulary")
    if max_new_tokens < 0:
        problems.append(f"--max-new-tokens {max_new_tokens} must be >= 0, e.g. --max-new-tokens 100")
    if problems:
        raise GenerateError("; ".join(problems))


def pick(scores: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None,
         sampler: str = "softmax") -> torch.Tensor:
    """The next token ids (B, 1) from the last position's scores (B, V): greedy at temperature <= 0, else a draw
    from the softmax of scores / T (sampler="stablemax": StableMax's s(x / T) / sum s(x / T)) over the top_k (s and
    exp are both increasing, so the top k are the same set). The same arithmetic as `Llama.generate`."""
    if temperature <= 0:
        return scores.argmax(dim=-1, keepdim=True)
    if sampler == "stablemax":
        from llmstable.losses import stablemax_probs

        probs = stablemax_probs(scores / temperature)
        if top_k is not None:
            kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
            probs = probs.masked_fill(scores < kth, 0.0)
        return torch.multinomial(probs, num_samples=1, generator=generator)
    logits = scores / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def generate_ids(model: Llama, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 sampler: str = "softmax") -> Iterator[torch.Tensor]:
    """The sampled ids (B, 1), one step at a time, so that a caller can show them as they come."""
    for _ in range(max_new_tokens):
        scores = model(idx[:, -model.cfg.max_seq_len:])[:, -1, :].float()  # (B, V)
        next_id = pick(scores, temperature, top_k, generator, sampler)
        idx = torch.cat([idx, next_id], dim=1)
        yield next_id


def stablemax_generate(model: Llama, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Like `Llama.generate`, sampling from StableMax instead of the softmax (see `pick`); temperature <= 0 is
    greedy."""
    steps = list(generate_ids(model, idx, max_new_tokens, temperature, top_k, generator, sampler="stablemax"))
    return torch.cat([idx, *steps], dim=1)


def stream_text(model: Llama, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0, sampler: str = "softmax") -> Iterator[str]:
    """The text of prompt + max_new_tokens sampled tokens, one piece per token as the tokens come (the prompt
    alone when there are none); joined, the pieces are the decoded whole. A piece is held back (an empty one
    comes instead) while the text so far ends in an incomplete character or a space: the next token may still
    change how those decode. Seeded, so the same model gives the same text. `sampler` is the distribution the run's
    loss defines (`samples_from` of its schema): a StableMax run samples from StableMax."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    shown = ""
    try:
        if max_new_tokens == 0:
            yield tokenizer.decode(ids, skip_special_tokens=False)
        for i, next_id in enumerate(generate_ids(model, idx, max_new_tokens, temperature, top_k, generator, sampler), 1):
            ids.append(int(next_id[0, 0]))  # host sync: one token at a time is the point of streaming
            text = tokenizer.decode(ids, skip_special_tokens=False)
            settled = text if i == max_new_tokens else text.rstrip().rstrip("\ufffd")
            common = shown if settled.startswith(shown) else _common_prefix(settled, shown)
            piece = settled[len(common):] if len(settled) > len(shown) or i == max_new_tokens else ""
            shown = shown if not piece else common + piece
            yield piece
    finally:
        model.train(was_training)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def sample_text(model: Llama, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0, sampler: str = "softmax") -> str:
    """Decode prompt + max_new_tokens sampled tokens (`stream_text`, joined)."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed, sampler))


def print_sample(engine, cfg, data, step: int) -> None:
    """The end-of-run sample (train.sample_tokens), printed by rank 0; every rank calls it."""
    model = sampling_model(engine, cfg, data.vocab_size)
    if model is not None:
        text = sample_text(model, data.tokenizer, "The", cfg.train.sample_tokens, seed=0,
                           sampler=cfg.loss.samples_from)
        print(f"\n--- sample after {step} steps ---\n{text}\n---")
