import pytest

from llmstable.config import TokenizerConfig
from llmstable.data import DataError
from llmstable.data.tokenizer import build_tokenizer, load_hf_tokenizer

TEXTS = ["The state of the Union is strong. " * 20, "Fellow citizens of the Senate and House. " * 20]


def test_bpe_is_trained_once_then_loaded_from_the_content_hash_cache(tmp_path):
    cfg = TokenizerConfig(kind="bpe", vocab_size=300)
    first = build_tokenizer(cfg, iter(TEXTS), "abc123", tmp_path)
    cached = tmp_path / "tokenizers" / "bpe-300-abc123.json"
    assert cached.exists()
    mtime = cached.stat().st_mtime_ns
    second = build_tokenizer(cfg, iter(["never read"]), "abc123", tmp_path)
    assert cached.stat().st_mtime_ns == mtime
    assert first("The state of the Union")["input_ids"] == second("The state of the Union")["input_ids"]
    assert len(first) == 300 and first.eos_token == "<|endoftext|>"
    build_tokenizer(cfg, iter(TEXTS[:1]), "other", tmp_path)
    assert (tmp_path / "tokenizers" / "bpe-300-other.json").exists()


def test_byte_level_bpe_round_trips_any_text(tmp_path):
    tok = build_tokenizer(TokenizerConfig(vocab_size=300), iter(TEXTS), "x", tmp_path)
    text = "Unseen: ünïcödé, emoji 🦅 and $1,000.50!"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_local_hf_tokenizer_folder_loads(tmp_path):
    tok = build_tokenizer(TokenizerConfig(vocab_size=300), iter(TEXTS), "x", tmp_path)
    tok.save_pretrained(str(tmp_path / "saved"))
    again = load_hf_tokenizer(str(tmp_path / "saved"))
    assert again("state of the Union")["input_ids"] == tok("state of the Union")["input_ids"]
    assert again.eos_token_id == tok.eos_token_id


def test_hub_tokenizer_offline_fails_with_a_clear_message():
    with pytest.raises(DataError, match=r"data.tokenizer.name_or_path='t5-base'.*HF_HUB_OFFLINE"):
        load_hf_tokenizer("t5-base")
