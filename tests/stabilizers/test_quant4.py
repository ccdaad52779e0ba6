import pytest
import torch

from llmstable.model import Llama, LlamaConfig
from llmstable.stabilizers import Quant4
from llmstable.stabilizers.quant4 import QuantLinear, fake_quantize

CFG = LlamaConfig(vocab_size=64, dim=64, intermediate_size=128, n_layers=2, n_heads=4, max_seq_len=16)


def test_int4_min_max_per_group_by_hand():
    w = torch.tensor([[0.0, 1.5, 3.0, 0.7, -1.0, -1.0, 2.0, 14.0]])
    fq = fake_quantize(w, bits=4, group_size=4)
    # group 1: min 0, max 3, step 0.2 -> 0.7 rounds to 0.8; group 2: min -1, max 14, step 1 -> exact
    torch.testing.assert_close(fq, torch.tensor([[0.0, 1.6, 3.0, 0.8, -1.0, -1.0, 2.0, 14.0]]))


def test_every_group_has_at_most_16_levels_and_keeps_its_min_and_max():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    fq = fake_quantize(w, 4, 32).reshape(8, 2, 32)
    g = w.reshape(8, 2, 32)
    step = (g.amax(-1) - g.amin(-1)) / 15
    for r in range(8):
        for c in range(2):
            assert len(torch.unique(fq[r, c])) <= 16
    torch.testing.assert_close(fq.amax(-1), g.amax(-1))
    torch.testing.assert_close(fq.amin(-1), g.amin(-1))
    assert torch.all((fq - g).abs() <= step.unsqueeze(-1) / 2 + 1e-6)  # round to nearest


def test_block_linears_are_quantized_and_the_rest_stay_full_precision():
    torch.manual_seed(0)
    model = Quant4(group_size=32).transform_model(Llama(CFG))
    wq = model.layers[0].attention.wq
    assert type(wq) is QuantLinear and type(model.layers[1].feed_forward.w2) is QuantLinear
    assert type(model.lm_head) is torch.nn.Linear and type(model.tok_embeddings) is torch.nn.Embedding
    x = torch.randn(3, 64)
    torch.testing.assert_close(wq(x), x @ fake_quantize(wq.weight.detach(), 4, 32).T)
    assert not torch.allclose(wq(x), x @ wq.weight.detach().T, atol=1e-4)


def test_gradients_pass_straight_through_to_the_master_weights():
    torch.manual_seed(0)
    model = Quant4(group_size=32).transform_model(Llama(CFG))
    lin = model.layers[0].feed_forward.w2
    x = torch.randn(5, 128)
    lin(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(5, 64).T @ x)
    assert lin.weight.dtype == torch.float32


def test_activation_quantization_is_per_token():
    torch.manual_seed(0)
    model = Quant4(group_size=32, act_bits=4).transform_model(Llama(CFG))
    lin = model.layers[0].attention.wo
    x = torch.randn(2, 3, 64)
    expected = fake_quantize(x, 4, 64) @ fake_quantize(lin.weight.detach(), 4, 32).T
    torch.testing.assert_close(lin(x), expected)


def test_parameter_names_and_objects_do_not_change():
    model = Llama(CFG)
    before = dict(model.named_parameters())
    after = dict(Quant4(group_size=32).transform_model(model).named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


def test_group_size_must_divide_the_layers(tmp_path):
    from llmstable.compose import compose_config
    from llmstable.config import ConfigError

    cfg = compose_config(["stabilizer=[quant4]"], run_dir=tmp_path)  # tiny_1m: 128*128 and 128*352 split in 256s
    assert cfg.stabilizer.quant4.group_size == 256
    with pytest.raises(ConfigError, match=r"stabilizer.quant4.group_size=100 does not divide the 16384 weights"):
        compose_config(["stabilizer=[quant4]", "stabilizer.quant4.group_size=100"], run_dir=tmp_path)
