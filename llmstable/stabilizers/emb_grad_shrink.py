"""Embedding-gradient shrink (GLM-130B, Zeng et al. 2022, arXiv 2210.02414, section 3): the output of the token
embedding is emb = alpha emb + (1 - alpha) emb.detach(), with alpha = 0.1. The forward values stay the same; the
gradient that reaches the embedding through its lookup is multiplied by alpha. GLM-130B found that most of its
loss spikes came with abnormal gradients in the embedding layer, and that shrinking them removed the spikes.

Written as emb.detach() + alpha (emb - emb.detach()): the same function and gradient, but the forward values are
bitwise those of the plain lookup (GLM's form rounds alpha e + (1 - alpha) e, which can differ by an ulp), so
logits, evaluations and the exported weights are exactly those of the model without the shrink.

Tied embeddings (`model.tie_embeddings`, as tiny_1m): the shared matrix gets two gradients, one through the
lookup and one through the LM head. Only the lookup's is shrunk: the matrix's gradient is alpha times the input
side plus the full output side. Untied models (llama_60m and larger) shrink the whole embedding gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstable.stabilizers.hooks import Stabilizer


def shrink_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x in the forward pass (bitwise), alpha times the incoming gradient in the backward pass."""
    frozen = x.detach()
    return frozen + alpha * (x - frozen)


class ShrunkEmbedding(torch.nn.Embedding):
    """An Embedding whose output gradient is scaled by `alpha`; its parameter and its name are the original's."""

    alpha: float = 0.1

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = F.embedding(idx, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                          self.sparse)
        return shrink_gradient(out, self.alpha)


class EmbGradShrink(Stabilizer):
    """Hook `transform_model`: turns the token embedding (`tok_embeddings`) into a `ShrunkEmbedding` in place
    (same Parameter, so nothing is re-registered and checkpoints keep their keys). No state, no metrics."""

    name = "emb_grad_shrink"

    def __init__(self, alpha: float = 0.1):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in (0, 1] (0.1 in GLM-130B)")
        self.alpha = alpha

    def transform_model(self, model: torch.nn.Module) -> torch.nn.Module:
        embedding = model.tok_embeddings
        if type(embedding) is not torch.nn.Embedding:
            raise TypeError(f"emb_grad_shrink expects tok_embeddings to be a torch.nn.Embedding, got "
                            f"{type(embedding).__name__}")
        embedding.__class__ = ShrunkEmbedding
        embedding.alpha = self.alpha
        return model
