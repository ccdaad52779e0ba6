"""OrthoGrad against the official orthograd.py's arithmetic, and its invariants: orthogonal to the weight, same
norm."""

import torch

from llmstable.model import Llama, LlamaConfig
from llmstable.stabilizers import OrthoGrad, orthogonalize

CFG = LlamaConfig(vocab_size=64, dim=32, intermediate_size=64, n_layers=2, n_heads=4, max_seq_len=8)


def official(w, g):
    """The official _orthogonalize_gradients, for one parameter."""
    w, g = w.view(-1), g.view(-1)
    proj = torch.dot(w, g) / (torch.dot(w, w) + 1e-30)
    g_orth = g - proj * w
    return g_orth * (g.norm(2) / (g_orth.norm(2) + 1e-30))


def test_equals_the_official_arithmetic_on_every_shape():
    gen = torch.Generator().manual_seed(0)
    for shape in [(48, 32), (32,), (4, 6, 8), (1,)]:
        w, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        assert torch.equal(orthogonalize(w, g).reshape(-1), official(w, g))


def test_the_result_is_orthogonal_to_the_weight_and_keeps_the_norm():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    g = torch.randn(64, 32, generator=gen, dtype=torch.float64) + 3 * w  # mostly along w
    out = orthogonalize(w, g)
    assert abs(torch.sum(out * w)) < 1e-10 * out.norm() * w.norm()
    torch.testing.assert_close(out.norm(), g.norm())
    # what is left is g's own component orthogonal to w, rescaled
    residual = g - (torch.sum(g * w) / torch.sum(w * w)) * w
    torch.testing.assert_close(out, residual * g.norm() / residual.norm())


def test_a_zero_weight_leaves_the_gradient_unchanged():
    g = torch.randn(5, 3)
    assert torch.equal(orthogonalize(torch.zeros(5, 3), g), g)


def test_hook_orthogonalizes_every_parameter_of_a_model():
    torch.manual_seed(0)
    model = Llama(CFG)
    for p in model.parameters():
        p.grad = torch.randn_like(p) + p.detach()  # a component along the weight
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    OrthoGrad().on_gradients(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, orthogonalize(p.detach(), before[n]))
        assert abs(torch.sum(p.grad * p.detach())) < 1e-4 * p.grad.norm() * p.detach().norm()
        torch.testing.assert_close(p.grad.norm(), before[n].norm())
