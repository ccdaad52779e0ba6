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
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
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


def tokenizer_hash(tok: PreTrainedTokenizerBase) -> str:
    """A content hash of the tokenizer's vocabulary and rules, for caching token arrays."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def vocab_size_of(tok: PreTrainedTokenizerBase) -> int:
    """Ids the model must be able to embed: the base vocabulary plus added special tokens."""
    return len(tok)
