"""The embedding-gradient shrink: forward values bitwise unchanged, the embedding's gradient times alpha (only the
lookup's share with tied embeddings), nothing else touched."""

import pytest
import torch

from llmstable.config import ConfigError
from llmstable.model import Llama, LlamaConfig
from llmstable.stabilizers import EmbGradShrink


def make(tied, shrink):
    cfg = LlamaConfig(vocab_size=64, dim=32, intermediate_size=64, n_layers=2, n_heads=4, max_seq_len=8,
                      tie_embeddings=tied)
    torch.manual_seed(0)
    model = Llama(cfg)
    if shrink is not None:
        model = EmbGradShrink(0.1).transform_model(model)
        model.tok_embeddings.alpha = shrink  # (0 below: only the LM head's share of a tied matrix)
    return model


def grads(model):
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 64), idx.roll(1).reshape(-1)).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_forward_values_are_bitwise_unchanged(tied):
    plain, _ = grads(make(tied, None))
    shrunk, _ = grads(make(tied, 0.1))
    assert torch.equal(plain, shrunk)


def test_untied_the_embedding_gradient_is_scaled_by_alpha_and_nothing_else_changes():
    _, plain = grads(make(False, None))
    _, shrunk = grads(make(False, 0.1))
    torch.testing.assert_close(shrunk["tok_embeddings.weight"], 0.1 * plain["tok_embeddings.weight"])
    for name in plain:
        if name != "tok_embeddings.weight":
            assert torch.equal(shrunk[name], plain[name]), name


def test_tied_only_the_lookups_share_is_scaled():
    _, plain = grads(make(True, None))  # lookup + head
    _, head_only = grads(make(True, 0.0))  # the head's share alone
    _, shrunk = grads(make(True, 0.1))
    key = "tok_embeddings.weight"
    torch.testing.assert_close(shrunk[key], 0.1 * (plain[key] - head_only[key]) + head_only[key])
    assert not torch.allclose(shrunk[key], 0.1 * plain[key])


def test_parameters_and_checkpoint_keys_are_the_originals():
    plain, shrunk = make(True, None), make(True, 0.1)
    assert list(plain.state_dict()) == list(shrunk.state_dict())
    assert shrunk.lm_head.weight is shrunk.tok_embeddings.weight


def test_alpha_outside_0_1_is_refused_by_the_config_and_the_class(tiny_config):
    with pytest.raises(ConfigError, match=r"stabilizer.emb_grad_shrink.alpha=0.0 must be in \(0, 1\]"):
        tiny_config("stabilizer=[emb_grad_shrink]", "stabilizer.emb_grad_shrink.alpha=0.0")
    with pytest.raises(ValueError, match="alpha=1.5"):
        EmbGradShrink(1.5)
