"""The optimizers llmstable takes from libraries, each against a short reference of its paper's update
(tests/optimizers/paper_reference.py) on a small problem. What they found is in the README (Stabilizers and arms)."""

import pytest
import torch

import paper_reference as ref
from llmstable.config import MuonConfig
from llmstable.model.llama import Llama, LlamaConfig
from llmstable.optimizers import build_optimizer
from llmstable.optimizers.muon import MuonWithAdamW

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def gradients(shape, steps, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) * (1 + (t % 3)) for t in range(steps)]


def run(optimizer_of, p0, grads):
    """The parameter after each step of a library optimizer fed the given gradients."""
    p = torch.nn.Parameter(p0.clone())
    opt = optimizer_of([p])
    out = []
    for g in grads:
        p.grad = g.clone().to(p.dtype)
        opt.step()
        out.append(p.detach().clone())
    return out


def assert_trajectories_close(got, want, rtol, atol=0.0):
    for t, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"step {t + 1}: {m}")


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("scale", ["match_rms_adamw", "original"])
def test_muon_matches_the_reference_update_with_fp32_newton_schulz(shape, scale):
    p0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.1
    grads = gradients(shape, 15)
    want = ref.muon(p0, grads, lr=0.02, weight_decay=0.1, scale=scale)
    got = run(lambda ps: MuonWithAdamW(ps, [], lr=0.02, weight_decay=0.1, adjust_lr_fn=scale, ns_dtype="fp32"),
              p0.float(), grads)
    # torch and the reference both keep the momentum as an EMA, B = mu*B + (1 - mu)*g, and look ahead by
    # (1 - mu)*g + mu*B (test below); what is left is torch's fp32 arithmetic against the float64 reference, ~1e-6.
    assert_trajectories_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_muon_keeps_its_momentum_as_an_ema_of_the_gradients():
    """B = mu*B + (1 - mu)*g, not B = mu*B + g: after steps of known gradients the buffer is their EMA."""
    p = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
    opt = MuonWithAdamW([p], [], lr=0.01, momentum=0.9)
    ema = torch.zeros_like(p)
    for g in gradients((4, 6), 5):
        p.grad = g.clone()
        opt.step()
        ema = 0.9 * ema + 0.1 * g
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], ema, rtol=1e-12, atol=1e-14)


def test_torch_muon_in_bf16_stays_within_bf16_rounding_of_the_reference():
    p0 = torch.zeros(16, 24, dtype=torch.float64)
    grads = gradients((16, 24), 10)
    want = ref.muon(p0, grads, lr=0.01)
    got = run(lambda ps: MuonWithAdamW(ps, [], lr=0.01, ns_dtype="bf16"), p0.float(), grads)
    step = 0.01 * 0.2 * 24**0.5  # the size of one orthogonal update's entries, roughly
    worst = max((a.double() - b).abs().max().item() for a, b in zip(got, want))
    assert worst < 0.05 * step * len(grads)  # bf16 has 8 bits of mantissa: about 1% per step, not a drift


def test_muon_with_adamw_gives_the_rest_to_torch_adamw_and_splits_the_model():
    model = Llama(LlamaConfig(vocab_size=64, dim=32, intermediate_size=64, n_layers=1, n_heads=4, max_seq_len=16))
    opt = build_optimizer(MuonConfig(lr=1e-2), model, torch.device("cpu"), total_steps=10)
    muon = {id(p) for g in opt.param_groups if g["muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if p.dim() == 2 and (".attention." in n or
                                                                                  ".feed_forward." in n)}
    p0 = torch.randn(8, dtype=torch.float64)
    grads = gradients(8, 6)
    got = run(lambda ps: MuonWithAdamW([], [{"params": ps}], lr=1e-2, betas=(0.9, 0.95)), p0, grads)
    want = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0), p0, grads)
    assert_trajectories_close(got, want, rtol=0, atol=0)


def test_lion_matches_the_paper_exactly():
    p0 = torch.randn(7, 5, dtype=torch.float64)
    grads = gradients((7, 5), 20)
    want = ref.lion(p0, grads, lr=1e-3, weight_decay=0.1)
    for foreach in (False, True):
        got = run(lambda ps: pytorch_optimizer.Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                                                    foreach=foreach), p0, grads)
        assert_trajectories_close(got, want, rtol=1e-12, atol=1e-14)


def test_soap_matches_the_paper_including_the_basis_refreshes():
    p0 = torch.randn(6, 6, dtype=torch.float64)
    grads = gradients((6, 6), 12)
    want = ref.soap(p0, grads, lr=3e-3, weight_decay=0.01, frequency=3)
    got = run(lambda ps: pytorch_optimizer.SOAP(ps, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01,
                                                precondition_frequency=3), p0, grads)
    assert torch.equal(got[0], p0)  # the first step only builds the preconditioner
    # Equal to 1e-12 until the first refresh of the bases; the library takes that QR in float32 even for float64
    # parameters, which leaves differences of about 1e-9 from there on.
    assert_trajectories_close(got[:4], want[:4], rtol=1e-12, atol=1e-14)
    assert_trajectories_close(got, want, rtol=1e-6, atol=1e-8)


def test_pytorch_optimizers_adam_mini_steps_per_block_with_the_old_partition():
    """optimizer.backend=pytorch_optimizer: the library's Adam-mini keeps the partition of before the official
    v1.1.0 (embedding and output entry by entry, every matrix but query and key one block); the official one is
    ours (tests/optimizers/test_adam_mini.py)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, intermediate_size=64, n_layers=1, n_heads=4, n_kv_heads=2,
                              max_seq_len=16))
    named = dict(model.named_parameters())
    start = {n: p.detach().double().clone() for n, p in named.items()}
    steps = 8
    grads = {n: gradients(p.shape, steps, torch.float32, seed=i) for i, (n, p) in enumerate(named.items())}
    opt = pytorch_optimizer.AdamMini(model, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, num_embeds=32,
                                     num_heads=4, num_query_groups=2)
    trajectories = {n: [] for n in named}
    for t in range(steps):
        for n, p in named.items():
            p.grad = grads[n][t].clone()
        opt.step()
        for n, p in named.items():
            trajectories[n].append(p.detach().clone())
    for n in named:
        if "tok_embeddings" in n or "lm_head" in n:
            blocks = None  # Adam, entry by entry
        elif n.endswith(("wq.weight", "wk.weight")):
            blocks = named[n].shape[0] // (32 // 4)  # one block per head: 4 query heads, 2 key heads
        else:
            blocks = 1  # every other tensor is one block (the official code now splits these per row)
        decay = 0.0 if "norm" in n else 0.1
        want = ref.adam_mini_block(start[n], [g.double() for g in grads[n]], lr=1e-2, blocks=blocks,
                                   weight_decay=decay)
        assert_trajectories_close(trajectories[n], want, rtol=1e-5, atol=1e-6)
