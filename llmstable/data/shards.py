"""Token shards on disk: the files `llmstable prepare` writes and training memory-maps.

A prepared directory holds

- `train-NNNNN.bin` and `val-NNNNN.bin`: flat little-endian arrays of token ids (uint16 when the vocabulary fits,
  uint32 otherwise), each document followed by EOS. Shard k of both series covers the same run of documents.
- `tokenizer/`: a copy of the tokenizer (`save_pretrained`), so the directory trains on its own.
- `manifest.json`: the dtype, the tokenizer's content hash, the corpus fingerprint, and for every shard its file,
  its token count and its SHA-256. It is written last: a directory without one is an unfinished `prepare`.
- `verified.json`: the shards whose SHA-256 was found to match, with the size and modification time they had then.
  A run's start checks every shard's size, and hashes only the shards this record does not vouch for (new, or
  changed since), so starting on a prepared corpus costs the same at 20 MB and at 40 GB; `llmstable verify DIR`
  hashes every shard whatever the record says (a bit flip changes no modification time).

The training stream is the concatenation of the train shards in order, exactly the token stream that packing
cut into blocks before shards existed, so the blocks (and the losses of a run) do not depend on where the shards
are cut. Every file is written to a temporary name and renamed when complete, so a reader never sees half a shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llmstable.data.corpus import DataError

MANIFEST = "manifest.json"
VERIFIED = "verified.json"
FORMAT = "llmstable-token-shards"
VERSION = 1


class PrepareDiskFull(DataError):
    """The disk filled up while `prepare` wrote a shard; the half-written file has been removed."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 of a file read in chunks: page cache, not process memory (hashlib releases the GIL here)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_error(err, path, 0) from err


def disk_error(err: OSError, path: Path, size_bytes: int) -> OSError | DataError:
    """A named error for a full disk (ENOSPC, or a quota); any other OSError is returned unchanged."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return err
    free = shutil.disk_usage(path.parent).free
    return PrepareDiskFull(
        f"the disk is full: writing {path} needed about {size_bytes / 1e6:.1f} MB more and {free / 1e6:.1f} MB "
        f"are free on {path.parent}. The half-written file was removed; free some space (or choose another out=) "
        "and rerun the same command: finished shards are kept and it continues from the next one."
    )


class ShardWriter:
    """Appends token arrays to a temporary file and, on `finish`, renames it into place.

    Memory holds one appended array at a time, never the shard. The SHA-256 is computed while writing. On a full
    disk the temporary file is removed before the named error is raised, so no half shard is ever visible."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.tokens = 0
        self._digest = hashlib.sha256()
        self._file = open(self.tmp, "wb")

    def append(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).tobytes()
        self._guarded(lambda: self._file.write(data), len(data))
        self._digest.update(data)
        self.tokens += len(tokens)

    def finish(self) -> dict:
        """Flush, fsync and rename; returns the manifest entry of the shard."""
        def close():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

        self._guarded(close, 0)
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "tokens": self.tokens, "sha256": self._digest.hexdigest()}

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def _guarded(self, action, size_bytes: int) -> None:
        try:
            action()
        except OSError as err:
            self.abort()
            raise disk_error(err, self.path, size_bytes) from err


# --- reading ---------------------------------------------------------------------------------------------------


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        unfinished = (root / "progress.json").exists()
        why = ("it holds an unfinished `llmstable prepare` (progress.json but no manifest.json): rerun the same "
               "prepare command to finish it" if unfinished else
               "run `llmstable prepare data=... out=DIR` first, or point data.path at a prepared directory")
        raise DataError(f"data.path={str(root)!r} is not a prepared token directory (no {MANIFEST}): {why}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): delete {root} and rerun `llmstable prepare`") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(
            f"{path} is not a {FORMAT} v{VERSION} manifest (format={manifest.get('format')!r}, "
            f"version={manifest.get('version')!r}): rerun `llmstable prepare` into a new directory"
        )
    return manifest


def check_shards(root: Path, entries: list[dict], dtype: np.dtype, checksums: bool = True) -> list[str]:
    """Problems with the shard files listed in the manifest: missing, wrong size, or (checksums=True) a SHA-256
    that differs. Files are hashed in parallel threads."""
    problems = []
    for entry in entries:
        path = root / entry["file"]
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["tokens"] * dtype.itemsize:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says "
                            f"{entry['tokens']} tokens x {dtype.itemsize} bytes")
    if problems or not checksums:
        return problems
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda e: sha256_file(root / e["file"]), entries))
    return [f"{root / e['file']} has SHA-256 {d[:16]}..., the manifest says {e['sha256'][:16]}..."
            for e, d in zip(entries, digests) if d != e["sha256"]]


def verify_shards(root: Path, entries: list[dict], dtype: np.dtype, full: bool = False) -> list[str]:
    """Problems with the manifest's shards: sizes always; SHA-256 for the shards verified.json does not vouch for
    (all of them with full=True). Shards found intact are added to the record (when the directory is writable)."""
    problems = check_shards(root, entries, dtype, checksums=False)
    if problems:
        return problems
    record = _read_record(root)
    todo = [e for e in entries if full or not _vouched(record.get(e["file"]), root / e["file"], e["sha256"])]
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda e: sha256_file(root / e["file"]), todo))
    bad = [f"{root / e['file']} has SHA-256 {d[:16]}..., the manifest says {e['sha256'][:16]}..."
           for e, d in zip(todo, digests) if d != e["sha256"]]
    record_verified(root, [e for e, d in zip(todo, digests) if d == e["sha256"]], record)
    return bad


def record_verified(root: Path, entries: list[dict], record: dict | None = None) -> None:
    """Add shards known to match their SHA-256 to verified.json; a read-only corpus keeps no record (and is hashed
    again at the next start)."""
    record = _read_record(root) if record is None else record
    for entry in entries:
        st = (root / entry["file"]).stat()
        record[entry["file"]] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry["sha256"]}
    try:
        write_json_atomic(root / VERIFIED, record)
    except (OSError, DataError):
        pass


def _read_record(root: Path) -> dict:
    try:
        record = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _vouched(seen, path: Path, sha256: str) -> bool:
    if not isinstance(seen, dict) or seen.get("sha256") != sha256:
        return False
    st = path.stat()
    return seen.get("bytes") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns


class TokenShards:
    """The concatenation of a series of memory-mapped shards, read as one flat token array.

    Only the pages a slice touches are read; resident memory does not grow with the corpus."""

    def __init__(self, root: Path, entries: list[dict], dtype: np.dtype):
        self.paths = [root / e["file"] for e in entries if e["tokens"] > 0]
        counts = [e["tokens"] for e in entries if e["tokens"] > 0]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.dtype = dtype
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:  # opened on first use: a run that reads few shards maps few files
            self._maps[k] = np.memmap(self.paths[k], dtype=self.dtype.newbyteorder("<"), mode="r")
        return self._maps[k]

    def slice(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the flat stream (copied, int64), across shard boundaries if needed."""
        stop = min(stop, len(self))
        parts = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            lo = start - int(self.starts[k])
            parts.append(np.asarray(self._map(k)[lo: lo + end - start], dtype=np.int64))
            start, k = end, k + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class ShardBlocks:
    """Blocks of seq_len + 1 tokens cut from a TokenShards stream, as `pack_blocks` cuts an in-memory array:
    block i is tokens[i * (seq_len + 1): (i + 1) * (seq_len + 1)] and the short tail is dropped."""

    def __init__(self, tokens: TokenShards, seq_len: int):
        self.tokens, self.width = tokens, seq_len + 1

    def __len__(self) -> int:
        return len(self.tokens) // self.width

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.tokens.slice(i * self.width, (i + 1) * self.width)


class PreparedCorpus:
    """A verified prepared directory: its tokenizer copy and its train and validation token streams."""

    def __init__(self, root: Path, name_or_path: str | None = None):
        from llmstable.data.tokenizer import load_hf_tokenizer, load_saved_tokenizer, tokenizer_hash

        self.root, self.manifest = root, read_manifest(root)
        m = self.manifest
        copy = root / m["tokenizer"]["dir"]
        if not copy.is_dir():
            raise DataError(f"{copy} is missing (the tokenizer the shards were made with): restore it, or rerun "
                            f"`llmstable prepare` into a new directory")
        self.tokenizer = load_saved_tokenizer(  # (its files' hash and a screen for code come before any load)
            copy, "Restore the original tokenizer folder, or rerun `llmstable prepare` into a new directory",
            m["tokenizer"].get("files_sha256"), root / MANIFEST, since="the shards were made")
        if tokenizer_hash(self.tokenizer) != m["tokenizer"]["hash"]:
            raise DataError(
                f"{copy} has changed since the shards were made (tokenizer hash {tokenizer_hash(self.tokenizer)}, "
                f"{root / MANIFEST} says {m['tokenizer']['hash']}): the token ids would mean other text. Restore the "
                "original tokenizer folder, or rerun `llmstable prepare` into a new directory"
            )
        if name_or_path:  # the config names a tokenizer: it must be the one the shards were made with
            named = load_hf_tokenizer(name_or_path)
            if tokenizer_hash(named) != m["tokenizer"]["hash"]:
                raise DataError(
                    f"data.tokenizer.name_or_path={name_or_path!r} is not the tokenizer {root} was prepared with "
                    f"(hash {tokenizer_hash(named)} vs {m['tokenizer']['hash']}): drop the override to use the "
                    f"copy in {copy}, or prepare the corpus again with this tokenizer"
                )
        self.dtype = np.dtype(m["dtype"])
        problems = verify_shards(root, m["train"] + m["val"], self.dtype)  # hashes only what is new or changed
        if problems:
            raise DataError(
                f"{root} does not match its {MANIFEST}: {'; '.join(problems[:5])}"
                f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Rerun the `llmstable prepare` "
                "command that made it: it keeps the intact shards and rewrites from the first damaged one"
            )
        self.train = TokenShards(root, m["train"], self.dtype)
        self.val = TokenShards(root, m["val"], self.dtype)
