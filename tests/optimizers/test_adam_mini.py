"""Adam-mini as the authors' official code (zyushun/Adam-mini v1.1.1) partitions and steps it: the reference applies
the official rules by hand to each parameter's name and shape (the substring sets of the official step(), not the
model's roles that llmstable asks), then steps each tensor with paper_reference.adam_mini_block."""

import math

import pytest
import torch

import paper_reference as ref
from llmstable.config import AdamMiniConfig
from llmstable.model.llama import Llama, LlamaConfig
from llmstable.optimizers import AdamMini, build_optimizer

# The official step()'s name sets (adam_mini/adam_mini.py), checked in this order after "bias".
QK = ("k_proj", "q_proj", "wq", "wk", "query", "key")
WV = ("v_proj", "wv", "value")
PER_ROW = ("embed", "embd", "wte", "lm_head", "output", "final_layer", "o_proj", "wo", "attn.proj",
           "feed_forward", "linear", "mlp")


def official_blocks(name: str, shape: torch.Size, dim: int, n_heads: int, wv_names=WV) -> int:
    """The number of second moments the official code gives a parameter: Adam per entry for a bias, one per head
    (dim * dim / n_heads entries) for query and key, one per row for embedding, output, value, attention output
    and MLP, else one for the whole tensor."""
    name, numel = name.lower(), math.prod(shape)
    if "bias" in name:
        return numel
    if any(k in name for k in QK):
        return numel // (dim * dim // n_heads)
    if any(k in name for k in (*PER_ROW, *wv_names)):
        return shape[0]
    return 1


def official_decay(name: str, weight_decay: float) -> float:
    return 0.0 if any(k in name.lower() for k in ("norm", "ln", "bias")) else weight_decay


def llama(**shape):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, dim=32, intermediate_size=48, n_layers=2, n_heads=4, max_seq_len=16)
    return Llama(LlamaConfig(**{**cfg, **shape})).double()


def test_the_official_rules_give_these_blocks_on_a_gqa_llama():
    """The anchor, counted by hand: 64 tokens, 4 query and 2 key heads of 8 x 32 entries, 16 value rows (2 heads of
    8), 32 output rows, 48 and 32 MLP rows, one block per norm."""
    model = llama(n_kv_heads=2, qk_norm=True)
    want = {"tok_embeddings.weight": 64, "lm_head.weight": 64, "norm.weight": 1}
    for i in range(2):
        want |= {f"layers.{i}.attention.wq.weight": 4, f"layers.{i}.attention.wk.weight": 2,
                 f"layers.{i}.attention.wv.weight": 16, f"layers.{i}.attention.wo.weight": 32,
                 f"layers.{i}.attention.q_norm.weight": 1, f"layers.{i}.attention.k_norm.weight": 1,
                 f"layers.{i}.feed_forward.w1.weight": 48, f"layers.{i}.feed_forward.w2.weight": 32,
                 f"layers.{i}.feed_forward.w3.weight": 48, f"layers.{i}.attention_norm.weight": 1,
                 f"layers.{i}.ffn_norm.weight": 1}
    assert {n: official_blocks(n, p.shape, 32, 4) for n, p in model.named_parameters()} == want
    opt = build_optimizer(AdamMiniConfig(), model, torch.device("cpu"), total_steps=10)
    assert isinstance(opt, AdamMini)
    assert {g["name"]: g["blocks"] for g in opt.param_groups} == want


def trajectories(model, opt, steps, seed=0):
    named = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    gen = torch.Generator().manual_seed(seed)
    grads = {n: [torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1 + t % 3) for t in range(steps)]
             for n, p in named.items()}
    got = {n: [] for n in named}
    for t in range(steps):
        for n, p in named.items():
            p.grad = grads[n][t].clone()
        opt.step()
        for n, p in named.items():
            got[n].append(p.detach().clone())
    return start, grads, got


@pytest.mark.parametrize("shape,cfg,wv_names", [
    (dict(n_kv_heads=2, qk_norm=True), AdamMiniConfig(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999)), WV),
    (dict(tie_embeddings=True), AdamMiniConfig(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)), WV),
    (dict(), AdamMiniConfig(lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95), value_blocks="whole"), ()),
], ids=["gqa_qk_norm", "tied", "value_whole"])
def test_each_tensor_steps_as_the_official_code_with_its_blocks(shape, cfg, wv_names):
    model = llama(**shape)
    opt = build_optimizer(cfg, model, torch.device("cpu"), total_steps=10)
    start, grads, got = trajectories(model, opt, steps=8)
    assert "lm_head.weight" in start or shape.get("tie_embeddings")
    for name in start:
        blocks = official_blocks(name, start[name].shape, 32, 4, wv_names)
        want = ref.adam_mini_block(start[name], grads[name], lr=cfg.lr, blocks=blocks, betas=cfg.betas,
                                   eps=cfg.eps, weight_decay=official_decay(name, cfg.weight_decay))
        for t, (a, b) in enumerate(zip(got[name], want)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name} step {t + 1}: {m}")


def test_a_tensor_without_a_gradient_keeps_its_state_and_step_count():
    model = llama()
    opt = build_optimizer(AdamMiniConfig(), model, torch.device("cpu"), total_steps=10)
    norm, head = model.norm.weight, model.lm_head.weight
    for step in range(3):
        for p in model.parameters():
            p.grad = None if p is norm and step > 0 else torch.ones_like(p)
        opt.step()
    assert opt.state[norm]["step"] == 1 and opt.state[head]["step"] == 3
    assert opt.state[head]["vmean"].shape == (64, 1)


def test_the_model_names_every_parameters_role_once():
    roles = llama(n_kv_heads=2, qk_norm=True).param_roles()
    assert roles["tok_embeddings.weight"] == "embedding" and roles["lm_head.weight"] == "output"
    assert roles["layers.1.attention.wk.weight"] == "key" and roles["layers.0.attention.q_norm.weight"] == "norm"
    assert roles["layers.0.attention.wo.weight"] == "attention_output"
    tied = llama(tie_embeddings=True).param_roles()
    assert "lm_head.weight" not in tied and tied["tok_embeddings.weight"] == "embedding"


def test_pytorch_optimizer_is_the_documented_variant_with_the_old_partition():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    opt = build_optimizer(AdamMiniConfig(backend="pytorch_optimizer"), llama(), torch.device("cpu"), total_steps=10)
    assert isinstance(opt, pytorch_optimizer.AdamMini)


def test_an_unknown_role_is_a_named_error():
    model = llama()
    roles = {**model.param_roles(), "norm.weight": "gate"}
    with pytest.raises(ValueError, match="no block rule for parameter 'norm.weight'"):
        AdamMini(model.named_parameters(), dim=32, n_heads=4, roles=roles)
