"""Tokenizers: a byte-level BPE trained locally with `tokenizers`, or any Hugging Face tokenizer.

Both end up as a `transformers.PreTrainedTokenizerFast` with an EOS token, so export, generation and packing
treat them alike. The trained BPE is cached under the data cache, keyed by the training documents' content hash
and the vocabulary size: the second run on the same corpus loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llmstable.config import TokenizerConfig
from llmstable.data.corpus import DataError

EOS = "<|endoftext|>"


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str], fingerprint: str, cache: Path) -> PreTrainedTokenizerBase:
    """The tokenizer the data config asks for. `texts` (training documents) are read only to train a BPE."""
    if cfg.kind == "hf":
        return load_hf_tokenizer(cfg.name_or_path)
    path = cache / "tokenizers" / f"bpe-{cfg.vocab_size}-{fingerprint}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        train_bpe(texts, cfg.vocab_size).save(str(tmp))
        os.replace(tmp, path)  # atomic: a concurrent run sees either no file or a whole one
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a GPT-2 style byte-level BPE (every byte is a token, so nothing is ever unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_hf_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    if os.path.isdir(name_or_path) and (reason := remote_code(Path(name_or_path))) is not None:
        raise DataError(f"data.tokenizer.name_or_path={name_or_path!r} needs code to run: {reason}. llmstable loads "
                        "tokenizers with trust_remote_code=False: pick a tokenizer that transformers reads without "
                        "code (a tokenizer.json), or convert this one where you trust it")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        hint = (
            "the Hub is switched off (HF_HUB_OFFLINE=1, llmstable's default); run with HF_HUB_OFFLINE=0 to "
            "download it once, or pass a local folder"
            if offline and not os.path.isdir(name_or_path) else "check the name or the folder"
        )
        raise DataError(
            f"could not load data.tokenizer.name_or_path={name_or_path!r}: {hint}. "
            f"Original error: {type(err).__name__}: {str(err)[:300]}"
        ) from err
    if tok.eos_token_id is None:
        raise DataError(
            f"data.tokenizer.name_or_path={name_or_path!r} has no EOS token, which packing needs between "
            "documents: pick a tokenizer with one"
        )
    return tok


def folder_hash(folder: Path) -> str:
    """SHA-256 over the names and bytes of every file in a saved tokenizer folder: checked against the manifest
    before anything loads the folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def remote_code(folder: Path) -> str | None:
    """What in a saved tokenizer folder would have transformers run code that comes with it (an `auto_map` in its
    JSON files, or a Python file), or None. Read as plain JSON and names, without loading anything."""
    import json

    folder = Path(folder)
    python = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    if python:
        return f"it holds Python code: {', '.join(python[:3])}"
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # (not this check's business: the load names an unreadable file)
        if isinstance(content, dict) and content.get("auto_map"):
            return f"{path.name} asks for custom classes (auto_map: {json.dumps(content['auto_map'])[:120]})"
    return None


def load_saved_tokenizer(folder: Path, fix: str, files_sha256: str | None = None, manifest: Path | None = None,
                         since: str = "it was written") -> PreTrainedTokenizerBase:
    """A tokenizer folder llmstable wrote (a prepared directory's copy, a run's), loaded only after the checks that
    need no load: the hash of its files against the manifest's (when it records one), and nothing in it that asks
    for code to run. Then transformers loads it, with trust_remote_code=False. `fix`: what the user should do
    when a check fails."""
    if files_sha256 is not None and folder_hash(folder) != files_sha256:
        raise DataError(f"{folder} has changed since {since} (its files hash to {folder_hash(folder)}, "
                        f"{manifest} says {files_sha256}): the token ids would mean other text, and it is not loaded. "
                        f"{fix}")
    reason = remote_code(folder)
    if reason is not None:
        raise DataError(f"{folder} is not a tokenizer llmstable wrote: {reason}. llmstable never runs code that comes "
                        f"with data or a run, so it is not loaded. {fix}")
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A content hash of the tokenizer's vocabulary and rules, for caching token arrays."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def vocab_size_of(tok: PreTrainedTokenizerBase) -> int:
    """Ids the model must be able to embed: the base vocabulary plus added special tokens."""
    return len(tok)
