"""The logits' indicators (llmstable.indicators): the attention-logit maximum against an explicit per-position
reference (with and without QK-norm, with grouped-query heads), the output log Z and maximum against the step's own
logits, through the trainer's step; nothing measured on unlogged steps or in evaluation; one measurement shared with
QK-clip; the same values through a compiled model."""

import math

import pytest
import torch

from llmstable import indicators as indicators_module
from llmstable.indicators import LogitIndicators
from llmstable.model import Llama, LlamaConfig
from llmstable.model.llama import apply_rope
from llmstable.parallel.world import World
from llmstable.stabilizers import QKClip


def reference_max_logits(model, batches) -> torch.Tensor:
    """(layers,) max over the batches, sequences, heads, i and j <= i of q_i . k_j / sqrt(hd) after QK-norm and
    RoPE, in float64, one sequence and head at a time, each layer's input recomputed with the model's own blocks."""
    cfg = model.cfg
    out = torch.full((cfg.n_layers,), -math.inf, dtype=torch.float64)
    for idx in batches:
        T = idx.shape[1]
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        x = model.tok_embeddings(idx)
        for n, layer in enumerate(model.layers):
            a = layer.attention
            h = layer.attention_norm(x)
            q = a.wq(h).view(*idx.shape, a.n_heads, a.head_dim)
            k = a.wk(h).view(*idx.shape, a.n_kv_heads, a.head_dim)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin).double()
            k = apply_rope(k.transpose(1, 2), cos, sin).double()
            group = a.n_heads // a.n_kv_heads
            past = torch.ones(T, T, dtype=torch.bool).tril()  # j <= i
            for b in range(idx.shape[0]):
                for head in range(a.n_heads):
                    scores = q[b, head] @ k[b, head // group].T / math.sqrt(a.head_dim)  # (T, T), float64
                    out[n] = max(out[n].item(), scores[past].max().item())
            x = layer(x, cos, sin)
    return out


def tiny(qk_norm=False, n_kv_heads=None, layers=2):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, dim=32, intermediate_size=48, n_layers=layers, n_heads=4,
                              n_kv_heads=n_kv_heads, max_seq_len=8, init_std=0.3, qk_norm=qk_norm))
    if qk_norm:  # QK-norm weights away from their init of 1, so that the reference must apply them
        for layer in model.layers:
            torch.nn.init.normal_(layer.attention.q_norm.weight, 1.0, 0.5)
            torch.nn.init.normal_(layer.attention.k_norm.weight, 1.0, 0.5)
    return model.train()


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 8), generator=g) for _ in range(n)]


def logged_step(model, indicators, micro, forward=None):
    """One logged step's forward passes (no backward needed) and its indicators."""
    indicators.begin(True)
    with torch.no_grad():
        for idx in micro:
            indicators.add_output((model if forward is None else forward)(idx))
    return indicators.values(World())


@pytest.mark.parametrize("qk_norm,n_kv_heads", [(False, None), (True, None), (True, 2)])
def test_a_logged_step_reports_the_explicit_reference(qk_norm, n_kv_heads, monkeypatch):
    monkeypatch.setattr(indicators_module, "CHUNK_LOGITS", 1)  # one sequence at a time: the chunking is exercised
    model, micro = tiny(qk_norm, n_kv_heads), batches()
    values = logged_step(model, LogitIndicators(model), micro)
    want = reference_max_logits(model, micro)
    for n in range(2):
        assert values[f"stab/attn_logit_max/layer_{n}"] == pytest.approx(want[n].item(), rel=1e-5)
    assert values["stab/attn_logit_max"] == pytest.approx(want.max().item(), rel=1e-5)
    assert values["stab/attn_logit_max/layer"] == int(want.argmax())
    with torch.no_grad():
        logits = torch.cat([model(idx) for idx in micro]).double()
    assert values["stab/output_log_z"] == pytest.approx(torch.logsumexp(logits, -1).mean().item(), rel=1e-6)
    assert values["stab/output_logit_max"] == pytest.approx(logits.max().item(), rel=1e-6)


def test_unlogged_steps_and_evaluation_measure_nothing(monkeypatch):
    calls = []
    measure = indicators_module.max_attention_logits
    monkeypatch.setattr(indicators_module, "max_attention_logits", lambda q, k: calls.append(1) or measure(q, k))
    model, micro = tiny(layers=3), batches(1)
    indicators = LogitIndicators(model)
    indicators.begin(False)
    with torch.no_grad():
        indicators.add_output(model(micro[0]))
    assert calls == [] and indicators.values(World()) == {}
    values = logged_step(model, indicators, micro)
    assert len(calls) == 3 and "stab/attn_logit_max" in values  # one measurement per layer
    model.eval()
    values = logged_step(model, indicators, micro)  # an evaluation forward is never measured
    assert len(calls) == 3 and "stab/attn_logit_max" not in values and "stab/output_log_z" in values


def test_qk_clip_and_the_indicators_share_one_measurement(monkeypatch):
    calls = []
    measure = indicators_module.max_attention_logits
    monkeypatch.setattr(indicators_module, "max_attention_logits", lambda q, k: calls.append(1) or measure(q, k))
    clip = QKClip(tau=1e9)
    model = clip.transform_model(tiny())
    indicators = LogitIndicators(model)
    micro = batches(1)
    indicators.begin(True)
    with torch.no_grad():
        indicators.add_output(model(micro[0]))
    clip.on_gradients(model)  # QK-clip closes the step's measurement first, as in the step
    values = indicators.values(World())
    assert len(calls) == 2  # each layer measured once for both
    assert values["stab/attn_logit_max"] == clip._step_max.max().item()
    clip.on_update(model)
    with torch.no_grad():  # an unlogged step: QK-clip measures alone and gets its own maxima, not the last ones
        model(batches(1, seed=7)[0])
    clip.on_gradients(model)
    assert len(calls) == 4 and clip._step_max is not None
    assert indicators.attention.close(indicators.reader) is not None  # (the indicators did not read this one)
    assert indicators.attention.close(indicators.reader) is None  # nothing new since


def test_a_compiled_model_reports_the_same_indicators():
    model, micro = tiny(), batches()
    indicators = LogitIndicators(model)
    eager = logged_step(model, indicators, micro)
    compiled = torch.compile(model, backend="eager")  # dynamo traces through the hooks (no C++ toolchain needed)
    for _ in range(2):  # the second time from the cache, after an unlogged step in between
        got = logged_step(model, indicators, micro, forward=compiled)
        assert got.keys() == eager.keys()
        for key, value in eager.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
        indicators.begin(False)
        with torch.no_grad():
            compiled(micro[0])
        assert indicators.attention.close(indicators.reader) is None


@pytest.mark.slow
@pytest.mark.trains
def test_the_trainer_logs_the_indicators_of_its_own_step_at_logged_steps_only(tiny_config, tmp_path):
    from llmstable.trainer import build_trainer

    cfg = tiny_config("train.log_interval=2", "stabilizer=[qk_norm]")
    trainer = build_trainer(cfg)
    try:
        loader, model = trainer.data.train, trainer.model
        for step in (1, 2):
            state = loader.state_dict()
            rows, _ = loader.next_share(8, 0, 8)  # the step's batch (TINY: global batch 8)
            loader.load_state_dict(state)
            with torch.no_grad():
                micro = [rows[i:i + 4, :-1] for i in (0, 4)]  # TINY: micro-batches of 4
                logits = torch.cat([model.eval()(x) for x in micro]).double()
                want = reference_max_logits(model, micro[:1]).max().item()
                want = max(want, reference_max_logits(model, micro[1:]).max().item())
            model.train()
            _, _, _, values = trainer.train_step(1e-3, indicators=step == 2)
            trainer.step += 1
            if step == 1:
                assert not any(k.startswith("stab/") for k in values)
                continue
            assert values["stab/attn_logit_max"] == pytest.approx(want, rel=1e-5)
            assert values["stab/output_log_z"] == pytest.approx(torch.logsumexp(logits, -1).mean().item(), rel=1e-5)
            assert values["stab/output_logit_max"] == pytest.approx(logits.max().item(), rel=1e-5)
            assert "optim/update_norm" in values  # the update's indicators are still there
    finally:
        trainer.log.close()
