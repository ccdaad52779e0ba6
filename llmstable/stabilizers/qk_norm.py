"""QK-norm: RMSNorm with learnable weights over the head dimension of queries and keys, before the rotary
embedding, which bounds the attention logits (Dehghani et al. 2023, arXiv 2302.05442; Wortsman et al. 2023,
arXiv 2309.14322). The model implements it (`q_norm`, `k_norm`); this switch turns it on."""

from __future__ import annotations

from llmstable.stabilizers.hooks import Stabilizer


class QKNorm(Stabilizer):
    """Hook `configure_model`: sets `qk_norm = True` on the model config. Export writes a Qwen3 architecture,
    which has the same q/k norms, so transformers reproduces the logits."""

    name = "qk_norm"

    def configure_model(self, model_cfg) -> None:
        model_cfg.qk_norm = True
