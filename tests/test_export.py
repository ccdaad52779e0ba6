"""Export to Hugging Face LlamaForCausalLM: transformers loads it offline and gives our logits."""

import pytest
import torch

from llmstable.export import ExportError, export_hf, load_trained
from llmstable.trainer import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from llmstable.compose import compose_config
    from conftest import TINY

    run = tmp_path_factory.mktemp("export") / "run"
    train(compose_config([*TINY, "train.max_steps=3", "model.n_kv_heads=2", "model.tie_embeddings=false"], run_dir=run))
    return run


@pytest.mark.parametrize("variant", ["untied_gqa", "tied", "qk_norm"])
@pytest.mark.trains
def test_exported_model_gives_the_same_logits_in_transformers(trained_run, tmp_path, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained_run
    if variant != "untied_gqa":  # a separately trained model
        from llmstable.compose import compose_config
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


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.trains
def test_overwrite_never_replaces_a_folder_that_is_not_an_export(trained_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"taken is not empty and is not an llmstable export"):
            export_hf(trained_run, tmp_path / "taken", overwrite=overwrite)
    assert snapshot(tmp_path / "taken") == {"keep.txt": b"mine"}


@pytest.mark.trains
def test_overwrite_replaces_an_earlier_export_only_when_asked(trained_run, tmp_path):
    out = export_hf(trained_run, tmp_path / "hf")
    assert (out / ".llmstable-export").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="already holds an export: pass --overwrite"):
        export_hf(trained_run, out)
    (out / "stale.txt").write_text("from before")
    export_hf(trained_run, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".hf.*"))  # no temporary or old folder left beside it


@pytest.mark.parametrize("target", ["run", "checkpoint_into_run", "inside_run", "above_run"])
@pytest.mark.trains
def test_export_never_writes_over_or_into_what_it_reads(trained_run, tmp_path, target):
    import shutil

    run = tmp_path / "parent" / "run"
    shutil.copytree(trained_run, run)
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    source, out = {"run": (run, run), "checkpoint_into_run": (checkpoint, run),
                   "inside_run": (run, run / "hf"), "above_run": (checkpoint, tmp_path / "parent")}[target]
    before = snapshot(run)
    with pytest.raises(ExportError, match="overlaps the run it exports"):
        export_hf(source, out, overwrite=True)
    assert snapshot(run) == before


@pytest.mark.trains
@pytest.mark.subprocess
def test_the_cli_refuses_to_export_a_run_onto_itself(trained_run, tmp_path):
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    done = subprocess.run([sys.executable, "-m", "llmstable.cli", "export", str(run), str(run), "--overwrite"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "overlaps the run it exports" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(run) == before


def test_export_from_a_directory_without_checkpoints_says_so(tmp_path):
    with pytest.raises(ExportError, match="no valid checkpoint"):
        export_hf(tmp_path, tmp_path / "out")


@pytest.mark.trains
def test_an_export_is_a_starting_point_for_init_from_in_either_naming(trained_run, tmp_path):
    # The route the trust model recommends for sharing: `llmstable export RUN OUT`, then train.init_from=OUT/
    # model.safetensors. The export holds Hugging Face's names; init_from takes them, and ours, to the same weights.
    from safetensors.torch import save_file

    from llmstable.checkpoint import load_initial_weights
    from llmstable.stabilizers import build_model_and_stabilizers

    out = export_hf(trained_run, tmp_path / "hf")
    trained, tokenizer, cfg = load_trained(trained_run)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "ours.safetensors"))
    for source in (out / "model.safetensors", tmp_path / "ours.safetensors"):
        torch.manual_seed(1)
        fresh, _ = build_model_and_stabilizers(cfg, len(tokenizer))
        load_initial_weights(fresh, source)
        for name, tensor in trained.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.trains
def test_init_from_names_each_tensor_that_does_not_fit_with_both_shapes(trained_run, tmp_path):
    import dataclasses

    from llmstable.checkpoint import CheckpointError, load_initial_weights
    from llmstable.stabilizers import build_model_and_stabilizers

    out = export_hf(trained_run, tmp_path / "hf")
    _, tokenizer, cfg = load_trained(trained_run)
    narrow = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=64, intermediate_size=176))
    model, _ = build_model_and_stabilizers(narrow, len(tokenizer))
    with pytest.raises(CheckpointError, match=r"does not fit this model: .*\(and \d+ more\)") as caught:
        load_initial_weights(model, out / "model.safetensors")
    assert "tok_embeddings.weight is [512, 128] in the file and [512, 64] in the model" in str(caught.value)


@pytest.mark.trains
def test_our_names_and_hugging_faces_map_one_to_one(trained_run):
    from llmstable.model.names import from_hf, to_hf

    model, _, _ = load_trained(trained_run)
    names = list(model.state_dict())
    assert [from_hf(to_hf(n)) for n in names] == names
    assert len({to_hf(n) for n in names}) == len(names)
    assert from_hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None
