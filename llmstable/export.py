"""Artifacts out of a run: load a trained model from a run directory or checkpoint, and export it to the
Hugging Face `LlamaForCausalLM` format (config, safetensors weights, tokenizer) that `transformers` loads
offline with the same logits. A model trained with QK-norm is written as `Qwen3ForCausalLM`, the transformers
architecture that is LLaMA plus RMSNorm on q and k over the head dim, before RoPE. A model trained with 4-bit
weights is exported with its full-precision master weights.

Our parameter names map one to one onto Hugging Face's, and the rotary layout is the same ("rotate half"), so
export is a rename: no weight is permuted or changed.

Export never deletes what it reads: a target that is, contains or lies inside the source run (or checkpoint) is
refused, and `--overwrite` replaces only a folder that llmstable itself exported (it carries `EXPORT_MARKER`).
The folder is written beside the target and renamed into place, so a failed export leaves the old one whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llmstable import checkpoint as ckpt
from llmstable.config import TrainConfig, load_config
from llmstable.model import Llama
from llmstable.model.names import to_hf
from llmstable.parallel.weights import read_weights
from llmstable.stabilizers import build_model_and_stabilizers

EXPORT_MARKER = ".llmstable-export"  # written into every exported folder; --overwrite replaces only such folders
LOGITS_NOTE = "LOGITS.md"  # written beside the weights when the run's loss was not the softmax cross-entropy


class ExportError(RuntimeError):
    """An export or load that cannot proceed; the message names the path and the fix."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its newest valid checkpoint)."""
    path = Path(path)
    if (path / ckpt.MANIFEST).exists():
        problem = ckpt.verify(path)
        if problem is not None:
            raise ExportError(f"checkpoint {path} cannot be read: {problem}")
        return path
    if not path.is_dir():
        raise ExportError(f"{path} does not exist: pass a run directory or RUN_DIR/checkpoints/step_NNNNNNNN")
    found = ckpt.latest_valid(path / "checkpoints")
    if found is None:
        raise ExportError(f"{path} has no valid checkpoint under {path / 'checkpoints'}: train it first")
    return found


def load_trained(path: str | Path, trusted: bool = False) -> tuple[Llama, object, TrainConfig]:
    """(model in eval mode on CPU, tokenizer, config) from a run directory or a checkpoint. trusted=True
    (--trust-checkpoint) also reads DCP and DeepSpeed checkpoints written under another account."""
    from llmstable.data.tokenizer import load_saved_tokenizer

    checkpoint = resolve_checkpoint(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(checkpoint / "config.yaml"))
    except Exception as err:  # noqa: BLE001  (yaml and OmegaConf raise several kinds)
        raise ExportError(f"{checkpoint / 'config.yaml'} is not a readable config: {err}") from err
    cfg = load_config(raw)
    tokenizer_dir = checkpoint.parent.parent / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise ExportError(f"{tokenizer_dir} is missing: the run directory must keep the tokenizer it trained with")
    tokenizer = load_saved_tokenizer(tokenizer_dir, "Restore the tokenizer/ folder the run trained with")
    cfg.stabilizer.quant4 = None  # export the full-precision master weights, as plain linears
    model, _ = build_model_and_stabilizers(cfg, len(tokenizer))
    read_weights(checkpoint, model, trusted)  # from any engine's format: safetensors, DCP shards or DeepSpeed ZeRO
    return model.eval(), tokenizer, cfg


def hf_config(model: Llama, tokenizer):
    """LlamaConfig, or Qwen3Config when the model has QK-norm."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import Qwen3Config

    c = model.cfg
    shared = dict(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, initializer_range=c.init_std,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if c.qk_norm:
        shared.pop("mlp_bias")
        return Qwen3Config(**shared, use_sliding_window=False)
    return HFLlamaConfig(**shared)


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    out = {to_hf(name): tensor for name, tensor in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def check_target(source: Path, checkpoint: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse a target that overlaps what is read, and a non-empty target that is not an earlier export (or is
    one, without --overwrite)."""
    target = out_dir.resolve()
    protected = {source.resolve(), checkpoint.resolve()}
    if checkpoint.resolve().parent.name == "checkpoints":  # inside a run directory, which holds the tokenizer too
        protected.add(checkpoint.resolve().parent.parent)
    for protected in protected:
        if target == protected or target in protected.parents or protected in target.parents:
            raise ExportError(
                f"export target {out_dir} overlaps the run it exports ({protected}): exporting there could delete "
                "the checkpoints it reads. Choose a folder outside the run directory, e.g. hf/NAME")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"export target {out_dir} exists and is not a folder: choose another path")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / EXPORT_MARKER).is_file():
        raise ExportError(f"export target {out_dir} is not empty and is not an llmstable export (no {EXPORT_MARKER} "
                          "in it), so --overwrite will not replace it: choose another folder, or empty it yourself")
    if not overwrite:
        raise ExportError(f"export target {out_dir} already holds an export: pass --overwrite to replace it, or "
                          "choose another folder")


def export_hf(path: str | Path, out_dir: str | Path, overwrite: bool = False, trusted: bool = False) -> Path:
    """Write a LlamaForCausalLM folder for the run or checkpoint at `path`."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    checkpoint = resolve_checkpoint(path)
    check_target(Path(path), checkpoint, out_dir, overwrite)
    model, tokenizer, cfg = load_trained(checkpoint, trusted)
    hf = AutoModelForCausalLM.from_config(hf_config(model, tokenizer))
    hf.config.llmstable_loss = cfg.loss.name  # saved in config.json: what the logits mean (see LOGITS.md)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [m for m in missing if not (model.cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"weight names do not map onto {type(hf).__name__}: missing {missing}, unexpected {unexpected}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"source": str(checkpoint.resolve())}) + "\n")
        if cfg.loss.replaces_cross_entropy:
            (tmp / LOGITS_NOTE).write_text(cfg.loss.export_note())
        if out_dir.exists():  # an earlier export (checked above), or an empty folder
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"could not write the export to {out_dir}: {err}; nothing was replaced") from err
    return out_dir

