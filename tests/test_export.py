"""Export to Hugging Face LlamaForCausalLM: transformers loads it offline and gives our logits."""

import pytest
import torch

from llmstable.export import ExportError, export_hf, load_trained
from llmstable.trainer import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from llmstable.cli import compose_config
    from conftest import TINY

    run = tmp_path_factory.mktemp("export") / "run"
    train(compose_config([*TINY, "train.max_steps=3", "model.n_kv_heads=2", "model.tie_embeddings=false"], run_dir=run))
    return run


@pytest.mark.parametrize("variant", ["untied_gqa", "tied", "qk_norm"])
def test_exported_model_gives_the_same_logits_in_transformers(trained_run, tmp_path, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained_run
    if variant != "untied_gqa":  # a separately trained model
        from llmstable.cli import compose_config
        from conftest import TINY

        extra = {"tied": ["model.tie_embeddings=true"], "qk_norm": ["stabilizer=[qk_norm]", "model.n_kv_heads=2"]}
        run = tmp_path / variant
        train(compose_config([*TINY, "train.max_steps=2", *extra[variant]], run_dir=run))
    out = export_hf(run, tmp_path / "hf")
    ours, tokenizer, _ = load_trained(run)
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if variant == "qk_norm" else "LlamaForCausalLM")
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = torch.tensor([hf_tok("Fellow citizens of the Senate and House of Representatives")["input_ids"]])
    assert ids.tolist() == [tokenizer("Fellow citizens of the Senate and House of Representatives")["input_ids"]]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)
    assert hf.config.tie_word_embeddings == ours.cfg.tie_embeddings == (variant != "untied_gqa")


def test_export_refuses_an_existing_target(trained_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"taken already exists.*--overwrite"):
        export_hf(trained_run, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_export_from_a_directory_without_checkpoints_says_so(tmp_path):
    with pytest.raises(ExportError, match="no valid checkpoint"):
        export_hf(tmp_path, tmp_path / "out")
