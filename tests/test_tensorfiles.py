"""Files of tensors from elsewhere (llmstable/tensorfiles.py): named for what they are before any parse, read
without running code, and checked for fit tensor by tensor."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from llmstable.tensorfiles import TensorFileError, fit_problems, kind, load_weights_only, read_safetensors


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_is_named_by_its_first_bytes(tmp_path):
    weights = {"w": torch.ones(2, 3)}
    save_file(weights, str(tmp_path / "a.safetensors"))
    torch.save(weights, tmp_path / "b.pt")
    torch.save(weights, tmp_path / "c.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "d.bin").write_bytes(pickle.dumps(weights))
    (tmp_path / "e").write_bytes(b"")
    (tmp_path / "f").write_text("hello, not weights")
    assert [kind(tmp_path / n) for n in ("a.safetensors", "b.pt", "c.pt", "d.bin", "e", "f")] == [
        "safetensors", "torch zip", "pickle", "pickle", "empty", "unknown"]


def test_a_pickle_given_as_safetensors_is_refused_before_it_is_read_with_a_safe_conversion(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    with pytest.raises(TensorFileError) as caught:
        read_safetensors(tmp_path / "w.safetensors", "train.init_from='w.safetensors'")
    message = str(caught.value)
    assert message.startswith("train.init_from='w.safetensors' is a PyTorch torch.save file (a zip archive holding "
                              "a pickle), not safetensors, so it is not read. llmstable never unpickles")
    assert "weights_only=True" in message and "weights_only=False" not in message
    assert "header too large" not in message


def test_a_payload_in_a_weights_only_file_is_refused_naming_what_it_asked_for_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker), "param_groups": []}, tmp_path / "optimizer.pt")
    with pytest.raises(TensorFileError) as caught:
        load_weights_only(tmp_path / "optimizer.pt", "Resume from another checkpoint.")
    message = str(caught.value)
    assert "optimizer.pt is refused: it asks for posix.system" in message and message.endswith("another checkpoint.")
    assert "weights_only=False" not in message and "add_safe_globals" not in message
    assert not marker.exists()
    assert load_weights_only(_saved(tmp_path, {"state": {0: {"step": torch.tensor(3.0)}}}), "")["state"][0]["step"] == 3


def test_a_damaged_torch_file_is_named(tmp_path):
    (tmp_path / "rng.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(TensorFileError, match=r"rng.pt is not a readable torch file .*damaged"):
        load_weights_only(tmp_path / "rng.pt", "")


def test_fit_names_each_tensor_with_both_shapes():
    assert fit_problems({"a": [4, 2], "b": [3], "c": [1]}, {"a": [4, 2], "b": [5]}) == [
        "b is [3] in the file and [5] in the model", "c [1] is not a parameter of this model"]


def _saved(tmp_path, obj):
    torch.save(obj, tmp_path / "ok.pt")
    return tmp_path / "ok.pt"
