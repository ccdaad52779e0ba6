import json

import pytest
import torch

from llmstable import checkpoint as ckpt
from llmstable.model import Llama, LlamaConfig
from llmstable.parallel.engines import Engine
from llmstable.parallel.world import World

CFG = LlamaConfig(vocab_size=50, dim=16, intermediate_size=24, n_layers=1, n_heads=2, max_seq_len=8)


def make():
    model = Llama(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def save(root, step, model, opt, keep=5):
    return ckpt.save_checkpoint(root, step, Engine(World(), model, opt), {"step": step}, "a: 1\n", keep=keep)


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = make()
    torch.manual_seed(123)
    path = save(tmp_path, 7, model, opt)
    expected_draw = torch.rand(3)
    other, other_opt = Llama(CFG), None
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    state = ckpt.load_checkpoint(path, Engine(World(), other, other_opt))
    assert state == {"step": 7}
    assert torch.equal(torch.rand(3), expected_draw)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert json.loads((path / "manifest.json").read_text())["step"] == 7


def test_only_the_newest_are_kept_and_temp_dirs_are_ignored(tmp_path):
    model, opt = make()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, keep=2)
    (tmp_path / ".tmp-step_00000009-1").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000003"]


@pytest.mark.parametrize("damage", ["flip", "missing", "no_manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    model, opt = make()
    save(tmp_path, 1, model, opt)
    newest = save(tmp_path, 2, model, opt)
    if damage == "flip":
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "missing":
        (newest / "optimizer.pt").unlink()
    else:
        (newest / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="step_00000002"):
        assert ckpt.latest_valid(tmp_path).name == "step_00000001"
    with pytest.raises(ckpt.CheckpointError, match="step_00000002"):
        ckpt.load_checkpoint(newest, Engine(World(), Llama(CFG), None))


def test_rewriting_the_same_step_replaces_it_whole(tmp_path):
    model, opt = make()
    save(tmp_path, 3, model, opt)
    path = ckpt.save_checkpoint(tmp_path, 3, Engine(World(), model, opt), {"step": 3, "again": True}, "", keep=5)
    assert ckpt.verify(path) is None and ckpt.read_state(path)["again"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]
