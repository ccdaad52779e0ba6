"""A LLaMA-style decoder, written top down: norm, rotary embedding, attention, MLP, block, model.

Pre-norm RMSNorm, rotary position embeddings, a SwiGLU MLP, no biases, causal attention through
`scaled_dot_product_attention` with optional grouped-query heads, tied or untied embeddings, init std 0.02.

The rotary embedding uses the "rotate half" layout of Hugging Face's `LlamaForCausalLM`, so exporting is a
rename of the weights and nothing has to be permuted. This file never imports `torch.distributed`:
parallelism, compilation and quantization are applied to the model from outside.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmstable.config.model import LlamaConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype, as LLaMA does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x (B, H, T, hd) by the position angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not saved in checkpoints: the tables are a pure function of the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix, ones for the norms (the LLaMA / GaLore recipe)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab)."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T].to(idx.device), self.rope_sin[:T].to(idx.device)  # (T, hd)
        x = self.tok_embeddings(idx)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def param_roles(self) -> dict[str, str]:
        """What each parameter is, by its name in named_parameters() (a tied LM head is the embedding): embedding,
        output, query, key, value, attention_output, mlp or norm. Optimizers that treat tensors by what they are
        (Adam-mini's blocks) ask this instead of matching substrings of names."""
        roles = {id(self.lm_head.weight): "output", id(self.tok_embeddings.weight): "embedding",
                 id(self.norm.weight): "norm"}
        for layer in self.layers:
            attn, mlp = layer.attention, layer.feed_forward
            roles.update({id(attn.wq.weight): "query", id(attn.wk.weight): "key", id(attn.wv.weight): "value",
                          id(attn.wo.weight): "attention_output", id(layer.attention_norm.weight): "norm",
                          id(layer.ffn_norm.weight): "norm"})
            roles.update({id(w.weight): "mlp" for w in (mlp.w1, mlp.w2, mlp.w3)})
            roles.update({id(n.weight): "norm" for n in (attn.q_norm, attn.k_norm) if n is not None})
        return {name: roles[id(p)] for name, p in self.named_parameters()}

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once. exclude_embedding drops the input embedding table,
        which costs no matmul FLOPs (the LM head, tied or not, is a real matmul and stays counted)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def non_embedding_params(self) -> int:
        """Parameters outside the input embedding and the LM head: Kaplan et al. 2020's N, the count Wortsman et al.
        2023 report model sizes by."""
        head = 0 if self.cfg.tie_embeddings else self.lm_head.weight.numel()
        return self.num_params() - self.tok_embeddings.weight.numel() - head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in PaLM appendix B:
        6 * (matmul parameters) + 12 * layers * dim * seq_len for the attention scores and values."""
        matmul_params = self.num_params(exclude_embedding=True)
        matmul_params -= sum(p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        return 6.0 * matmul_params + 12.0 * self.cfg.n_layers * self.cfg.dim * seq_len

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of idx (B, T). No KV cache: this is for short samples, not serving."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.max_seq_len:]
            logits = self(context)[:, -1, :].float()  # (B, V)
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx


def llama_config(model_cfg, vocab_size: int) -> LlamaConfig:
    """The model group's config -> LlamaConfig, with the vocabulary size filled in from the tokenizer
    when the model file leaves it null."""
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    values = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k in fields}
    values["vocab_size"] = model_cfg.vocab_size or vocab_size
    return LlamaConfig(**values)


def build_model(cfg: LlamaConfig, device: torch.device | str = "cpu") -> Llama:
    """Build and initialise the model on `device` (init happens on CPU first, so the weights for a given
    seed are the same on every device)."""
    return Llama(cfg).to(device)
