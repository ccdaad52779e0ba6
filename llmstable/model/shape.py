"""The shape of the network, apart from the network (llama.py) so that the config schema can use it without
importing torch: `llmstable prepare`, `report` and `spikes` start in a fraction of the time."""

from __future__ import annotations

from dataclasses import dataclass


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
