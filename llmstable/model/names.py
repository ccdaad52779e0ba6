"""Parameter names: ours (LLaMA's: `tok_embeddings`, `layers.N.attention.wq`, ...) and Hugging Face's
`LlamaForCausalLM` / `Qwen3ForCausalLM` (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...).

They map one to one and the rotary layout is the same, so converting is a rename: `llmstable export` writes
Hugging Face's names, and `train.init_from` reads either.
"""

from __future__ import annotations

HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_OURS = {hf: ours for ours, hf in HF_NAMES.items()}
_OURS_IN_LAYER = {hf: ours for ours, hf in HF_LAYER_NAMES.items()}
HF_LAYER_PREFIX = "model.layers."


def to_hf(name: str) -> str:
    """Our name -> Hugging Face's (KeyError for a name with no counterpart)."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"{HF_LAYER_PREFIX}{index}.{HF_LAYER_NAMES[rest]}"
    return HF_NAMES[name]


def from_hf(name: str) -> str | None:
    """Hugging Face's name -> ours, or None for a name that is not one of the mapped ones."""
    if name.startswith(HF_LAYER_PREFIX):
        index, _, rest = name[len(HF_LAYER_PREFIX):].partition(".")
        ours = _OURS_IN_LAYER.get(rest)
        return f"layers.{index}.{ours}" if ours is not None and index.isdigit() else None
    return _OURS.get(name)


def is_hf_naming(names) -> bool:
    """Whether a set of tensor names is Hugging Face's (an export) rather than ours."""
    return any(n.startswith(HF_LAYER_PREFIX) or n == "model.embed_tokens.weight" for n in names)


def to_ours(weights: dict) -> dict:
    """A state dict in either naming, with our names (a Hugging Face name that does not map is kept as it is, so
    that the fit check names it)."""
    if not is_hf_naming(weights):
        return dict(weights)
    return {from_hf(name) or name: tensor for name, tensor in weights.items()}
