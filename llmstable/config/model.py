"""The network's shape: `LlamaConfig`, what the model (llmstable.model.llama) is built from, and `ModelConfig`, the
`model` group's schema (`configs/model/*.yaml`) that fills one. Torch-free, so the config layer, `llmstable prepare`,
`report` and `spikes` load without torch."""

from __future__ import annotations

from dataclasses import dataclass

from llmstable.config.checks import divisors_near, positive


@dataclass
class LlamaConfig:
    """The shape of the network. A YAML file in `configs/model/` fills one of these."""

    vocab_size: int = 32000
    dim: int = 512  # hidden size
    intermediate_size: int = 1376  # SwiGLU inner size
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None means n_heads (no grouped-query attention)
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    qk_norm: bool = False  # RMSNorm over the head dim of q and k before RoPE (Dehghani et al. 2023)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass
class ModelConfig(LlamaConfig):
    """The network's shape (`configs/model/*.yaml`); fields as in `LlamaConfig`."""

    name: str = "custom"
    vocab_size: int | None = None  # None: take the tokenizer's vocabulary size

    def validate(self, problems: list[str]) -> None:
        for key in ("dim", "intermediate_size", "n_layers", "n_heads", "max_seq_len"):
            positive(problems, f"model.{key}", getattr(self, key))
        if self.vocab_size is not None:
            positive(problems, "model.vocab_size", self.vocab_size)
        if self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: "
                f"choose n_heads among the divisors of dim, e.g. {divisors_near(self.dim, self.n_heads)}"
            )
        elif self.n_heads > 0 and self.head_dim % 2:
            problems.append(f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            problems.append(
                f"model.n_kv_heads={self.n_kv_heads} must be a positive divisor of model.n_heads={self.n_heads} "
                "(or null for no grouped-query attention)"
            )
        if self.init_std <= 0:
            problems.append(f"model.init_std={self.init_std} must be > 0 (LLaMA uses 0.02)")
