from pathlib import Path

import pytest
import torch

from llmstable.model import Llama, LlamaConfig

SMALL = LlamaConfig(vocab_size=97, dim=32, intermediate_size=48, n_layers=2, n_heads=4, max_seq_len=16)


def test_forward_shapes():
    model = Llama(SMALL)
    logits = model(torch.randint(0, 97, (3, 10)))
    assert logits.shape == (3, 10, 97)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(kv_heads):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**SMALL.__dict__, "n_kv_heads": kv_heads})).eval()
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_grouped_query_attention_has_fewer_kv_parameters():
    full = Llama(SMALL)
    gqa = Llama(LlamaConfig(**{**SMALL.__dict__, "n_kv_heads": 1}))
    assert gqa.layers[0].attention.wk.weight.shape == (8, 32)
    assert full.num_params() - gqa.num_params() == 2 * 2 * 32 * (32 - 8)


def test_tied_embeddings_share_one_tensor_and_count_once():
    tied = Llama(LlamaConfig(**{**SMALL.__dict__, "tie_embeddings": True}))
    untied = Llama(SMALL)
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_non_embedding_params_leave_out_the_embedding_and_the_head_tied_or_not():
    blocks = 2 * (4 * 32 * 32 + 3 * 32 * 48 + 2 * 32) + 32  # attention, MLP and two norms per block; the final norm
    tied = Llama(LlamaConfig(**{**SMALL.__dict__, "tie_embeddings": True}))
    assert Llama(SMALL).non_embedding_params() == tied.non_embedding_params() == blocks


def test_init_std_is_002_and_norms_are_one():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=4096, dim=256, intermediate_size=512, n_layers=1, n_heads=4))
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 5e-4
    assert abs(model.layers[0].feed_forward.w1.weight.std().item() - 0.02) < 5e-4
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_flops_per_token_follows_the_6n_plus_attention_formula():
    model = Llama(SMALL)
    blocks = 2 * (4 * 32 * 32 + 3 * 32 * 48)
    assert model.flops_per_token(16) == 6 * (blocks + 97 * 32) + 12 * 2 * 32 * 16


def test_rejects_a_sequence_longer_than_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len=16"):
        Llama(SMALL)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("name,expected_millions", [
    ("llama_60m", 58.1), ("llama_130m", 134.1), ("llama_350m", 368.0), ("llama_1b", 1339.1),
])
def test_published_sizes_match_hf_llama_parameter_counts(name, expected_millions):
    """Built on the meta device: no memory is allocated even for 1B."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from llmstable.config import ModelConfig, load_config
    from llmstable.model import llama_config

    raw = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "configs" / "model" / f"{name}.yaml"))
    model_cfg = load_config({"model": raw, "run_dir": "unused", "train": {"max_steps": 1, "budget_tokens": None}}).model
    assert isinstance(model_cfg, ModelConfig) and model_cfg.vocab_size == 32000
    with torch.device("meta"):
        ours = Llama(llama_config(model_cfg, 32000))
        hf = LlamaForCausalLM(HFConfig(
            vocab_size=32000, hidden_size=model_cfg.dim, intermediate_size=model_cfg.intermediate_size,
            num_hidden_layers=model_cfg.n_layers, num_attention_heads=model_cfg.n_heads, tie_word_embeddings=False,
        ))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert ours.num_params() == hf_count
    assert abs(hf_count / 1e6 - expected_millions) / expected_millions < 0.002
