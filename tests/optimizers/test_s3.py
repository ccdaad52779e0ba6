"""SignSoftSGD (S3): against a float64 per-entry reference of the paper's algorithm, the paper's bound
|delta w| <= lr, and its p = 2 relation to Adam."""

import io
import math

import pytest
import torch

from llmstable.optimizers import S3
from reference import ReferenceS3
from streams import gradients, make_params, max_diff, run

HP = dict(lr=1e-2, beta=0.95, p=3.0, weight_decay=0.1)


@pytest.mark.parametrize("power,nesterov", [(3.0, True), (1.0, True), (2.5, False)])
def test_matches_the_float64_reference_with_spikes_and_decay(power, nesterov):
    kw = {**HP, "p": power, "nesterov": nesterov}
    ours, _, _ = run(lambda g: S3(g, **kw), 200)
    ref, _, _ = run(lambda g: ReferenceS3(g, **kw), 200)
    assert max_diff(ours, ref) < 1e-6


@pytest.mark.slow
@pytest.mark.subprocess  # (inductor starts its compile workers and the C++ compiler)
def test_compiled_update_matches_the_eager_one():
    ours, _, _ = run(lambda g: S3(g, compiled=True, **HP), 40)
    ref, _, _ = run(lambda g: S3(g, **HP), 40)
    assert max_diff(ours, ref) < 1e-6


def largest_step(opt, params, lr, steps=120):
    """max |delta w| / lr over a stream of 1000x spikes every 13 steps, then a constant gradient (where steps
    approach lr), weight decay off."""
    largest = 0.0
    for t in range(1, steps):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, gradients(t, params, spike_every=13)):
            p.grad = g if t < steps // 2 else torch.full_like(g, 0.02)
        opt.step()
        largest = max(largest, max((p.detach() - b).abs().max().item() for p, b in zip(params, before)))
    return largest / lr


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_the_algorithm_moves_every_entry_by_at_most_lr(power, nesterov):
    """The paper's bound, on the float64 reference (no clamp): |delta w| <= lr for every entry at every step
    (up to the fp32 rounding of the weights, 2.5e-7 / lr), and the bound is reached, so it is not vacuous. The
    optimizer equals this reference (test above), so it inherits the bound without its clamp ever acting."""
    lr = 1e-2
    params = make_params()
    ratio = largest_step(ReferenceS3([{"params": params}], lr=lr, p=power, nesterov=nesterov), params, lr)
    assert 0.95 < ratio <= 1 + 2.5e-7 / lr


def test_the_bound_survives_fp32_underflow_of_g_to_the_p_for_large_p():
    """p = 8: |g|^8 leaves fp32's normal range for |g| below about 1.7e-5 (subnormal, then 0), so without the
    clamp a small gradient would move an entry by several times lr (3.3 lr on this stream)."""
    lr = 1e-2
    params = make_params()
    g = gradients(1, params)[0]
    assert torch.any((g.abs() ** 8 < torch.finfo(torch.float32).tiny) & (g.abs() > 1e-8))  # the stream underflows
    assert largest_step(S3([{"params": params}], lr=lr, p=8.0), params, lr) <= 1 + 1e-6


def test_the_plain_denominator_would_break_the_bound_for_a_nesterov_step():
    """Why the Nesterov step's denominator takes the look-ahead too: after a quiet history, a spike over
    s^(1/p) alone moves an entry by (1 + beta)(1 - beta)^(1 - 1/p) lr, above lr for p = 1."""
    beta, g = 0.95, 100.0
    numerator = beta * (1 - beta) * g + (1 - beta) * g  # m was ~0, then the spike
    assert numerator / ((1 - beta) * g) == pytest.approx(1 + beta)  # p = 1, plain s: 1.95 lr
    p = torch.nn.Parameter(torch.zeros(1))
    opt = S3([p], lr=1.0, beta=beta, p=1.0)
    for _ in range(50):
        p.grad = torch.full((1,), 1e-6)
        opt.step()
    before = p.detach().clone()
    p.grad = torch.full((1,), g)
    opt.step()
    assert (p.detach() - before).abs().item() <= 1.0


def test_with_p_2_and_no_nesterov_it_is_adam_with_equal_betas_without_bias_correction():
    """The paper's relation to Adam: p = 2 is Adam's second moment, and one beta means beta1 = beta2. torch's Adam
    divides m by (1 - b^t) and v by (1 - b^t); S3 corrects neither, so Adam at lr sqrt(1 - b^t) is S3 at lr."""
    beta, lr = 0.95, 1e-3
    ours, _, _ = run(lambda g: S3(g, lr=lr, beta=beta, p=2.0, eps=0.0, nesterov=False), 50)
    torch.manual_seed(0)
    params = make_params()
    adam = torch.optim.Adam([{"params": params}], lr=lr, betas=(beta, beta), eps=0.0, foreach=False)
    for t in range(1, 51):
        adam.param_groups[0]["lr"] = lr * math.sqrt(1 - beta**t)
        for p, g in zip(params, gradients(t, params)):
            p.grad = g
        adam.step()
    assert max_diff([ours[-1]], [[p.detach() for p in params]]) < 1e-6


def test_state_dict_round_trip_resumes_bit_identically():
    full, _, _ = run(lambda g: S3(g, **HP), 50)
    _, opt, params = run(lambda g: S3(g, **HP), 30)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = S3([{"params": clone}], **HP)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    for t in range(31, 51):
        for p, g in zip(clone, gradients(t, clone)):
            p.grad = g
        again.step()
    for a, b in zip(full[-1], clone):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr=-1.0"), (dict(beta=1.0), "beta=1.0"), (dict(p=0.5), "p=0.5"),
])
def test_impossible_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S3(make_params(), **kwargs)
