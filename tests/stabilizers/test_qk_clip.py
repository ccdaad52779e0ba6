"""QK-clip: the measured maximum against an explicit per-position reference, the bound after the rescale (every
head's largest logit at or under tau, heads under tau untouched bit for bit), grouped-query heads, the interval,
the metrics, and the config errors."""

import math

import pytest
import torch

from llmstable.compose import compose_config
from llmstable.config import ConfigError
from llmstable.model import Llama, LlamaConfig
from llmstable.model.llama import apply_rope
from llmstable.stabilizers import QKClip, max_attention_logits, qk_clip_scales
from llmstable import indicators as indicators_module


def reference_max_logits(model, idx):
    """Per layer and head, max over (b, i, j <= i) of q_i . k_j / sqrt(hd), one dot product at a time, recomputing
    each layer's input with the model's own blocks."""
    cfg = model.cfg
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.tok_embeddings(idx)
    out = []
    group = cfg.n_heads // cfg.kv_heads
    for layer in model.layers:
        a = layer.attention
        h = layer.attention_norm(x)
        q = apply_rope(a.wq(h).view(*idx.shape, a.n_heads, a.head_dim).transpose(1, 2), cos, sin).double()
        k = apply_rope(a.wk(h).view(*idx.shape, a.n_kv_heads, a.head_dim).transpose(1, 2), cos, sin).double()
        heads = []
        for head in range(a.n_heads):
            best = -math.inf
            for b in range(idx.shape[0]):
                for i in range(T):
                    for j in range(i + 1):
                        best = max(best, (q[b, head, i] @ k[b, head // group, j]).item() / math.sqrt(a.head_dim))
            heads.append(best)
        out.append(heads)
        x = layer(x, cos, sin)
    return torch.tensor(out, dtype=torch.float64)


def tiny(n_kv_heads=None, std=0.3):
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=50, dim=32, intermediate_size=48, n_layers=2, n_heads=4,
                             n_kv_heads=n_kv_heads, max_seq_len=8, init_std=std))


def measure(model, hook, idx):
    with torch.no_grad():
        model(idx)
    hook.on_gradients(model)
    return hook._step_max.clone()


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_the_measured_maximum_equals_the_explicit_reference(n_kv_heads, monkeypatch):
    monkeypatch.setattr(indicators_module, "CHUNK_LOGITS", 1)  # one sequence at a time: the chunking is exercised
    model, hook = tiny(n_kv_heads), QKClip(tau=1.0)
    model = hook.transform_model(model)
    idx = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(measure(model, hook, idx).double(), reference_max_logits(model, idx),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_after_the_rescale_every_head_is_at_most_tau_and_heads_under_tau_are_untouched(n_kv_heads):
    model = tiny(n_kv_heads)
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    before = reference_max_logits(model, idx)
    tau = before[0].sort().values[1].item() + 1e-3  # a mix: one or two heads of layer 0 under tau, the rest over
    hook = QKClip(tau=tau)
    model = hook.transform_model(model)
    q0, k0 = model.layers[0].attention.wq.weight.clone(), model.layers[0].attention.wk.weight.clone()
    measure(model, hook, idx)
    hook.on_update(model)
    after = reference_max_logits(model, idx)
    # Layer 0's input (the embedding) does not move, so its heads are each scaled by exactly their own gamma.
    torch.testing.assert_close(after[0], before[0].clamp(max=tau), rtol=1e-5, atol=1e-6)
    group, hd = 4 // (n_kv_heads or 4), 8
    for head in range(4):
        rows = slice(head * hd, (head + 1) * hd)
        kv = head // group
        kv_rows = slice(kv * hd, (kv + 1) * hd)
        if all(before[0, h] <= tau for h in range(kv * group, (kv + 1) * group)):  # the whole group under tau
            assert torch.equal(model.layers[0].attention.wq.weight[rows], q0[rows])
            assert torch.equal(model.layers[0].attention.wk.weight[kv_rows], k0[kv_rows])
    assert hook.metrics()["stab/qk_clip/clipped_heads"] == int((before > tau).sum())


def test_kimi_rule_without_groups_and_the_gqa_split():
    gamma_from = torch.tensor([200.0, 50.0, 400.0, 100.0])
    q, k, clipped = qk_clip_scales(gamma_from, 4, tau=100.0, alpha=0.5)
    torch.testing.assert_close(q, torch.tensor([0.5 ** 0.5, 1.0, 0.25 ** 0.5, 1.0]))
    torch.testing.assert_close(k, q)
    assert clipped.tolist() == [True, False, True, False]
    q, k, _ = qk_clip_scales(gamma_from, 2, tau=100.0, alpha=0.5)  # groups (200, 50) and (400, 100)
    torch.testing.assert_close(k, torch.tensor([0.5 ** 0.5, 0.25 ** 0.5]))
    torch.testing.assert_close(q * k.repeat_interleave(2), torch.tensor([0.5, 1.0, 0.25, 1.0]))  # each its own gamma


def test_interval_measures_every_other_update_and_metrics_are_logged():
    model, hook = tiny(), QKClip(tau=1e9, interval=2)
    model = hook.transform_model(model)
    model.train()
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    seen = []
    for _ in range(4):
        with torch.no_grad():
            model(idx)
        hook.on_gradients(model)
        seen.append(hook._step_max is not None)
        hook.on_update(model)
    assert seen == [True, False, True, False]
    metrics = hook.metrics()
    assert set(metrics) == {"stab/qk_clip/clipped_heads", "stab/qk_clip/max_logit", "stab/qk_clip/max_logit/layer_0",
                            "stab/qk_clip/max_logit/layer_1"}
    assert metrics["stab/qk_clip/max_logit"] == max(metrics["stab/qk_clip/max_logit/layer_0"],
                                                    metrics["stab/qk_clip/max_logit/layer_1"])
    model.eval()  # evaluation forwards are not measured
    with torch.no_grad():
        model(idx)
    hook.on_gradients(model)
    assert hook._step_max is None


def test_max_attention_logits_masks_the_future():
    q = torch.zeros(1, 1, 3, 2)
    k = torch.zeros(1, 1, 3, 2)
    q[0, 0, 0] = torch.tensor([1.0, 0.0])
    k[0, 0, 2] = torch.tensor([100.0, 0.0])  # only a future key would give a large logit
    assert max_attention_logits(q, k).item() == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["stabilizer=[qk_norm,qk_clip]"], "stabilizer=[qk_norm,qk_clip]: QK-clip rescales W_q and W_k"),
    (["stabilizer=[qk_clip]", "stabilizer.qk_clip.tau=0"], "stabilizer.qk_clip.tau=0.0 must be > 0"),
    (["stabilizer=[qk_clip]", "stabilizer.qk_clip.alpha=2"], "stabilizer.qk_clip.alpha=2.0 must be in [0, 1]"),
    (["stabilizer=[qk_clip]", "stabilizer.qk_clip.interval=0"], "stabilizer.qk_clip.interval=0 must be >= 1"),
])
def test_bad_settings_are_named(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides, run_dir=tmp_path)
    assert message in str(err.value)
