"""The setup a worker scores runs with, as a fingerprint: sha256 of the fixed files that decide
how a run is scored, of the tokenizer, of the data manifest and the validation shard, and the GPU
model, driver and torch version. A tag pins the fingerprint of its first run; results from another
setup must never be compared with its results silently.

Computed once per worker process (the parent, before the pool forks) without importing torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path

from app.config import PROJECT_ROOT
from workers import gpu

# The project's files that decide how a run is scored: the profiles, data, tokenizer and
# evaluation of prepare.py, and the profile table it reads.
FIXED_FILES = ("prepare.py", "run_profiles.py")
VAL_SHARD = "shard_06542.parquet"  # prepare.VAL_FILENAME, named here to keep torch out of the worker


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_sha256(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{_sha256(path)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str | None:
    return _sha256(path) if path.is_file() else None


def _driver() -> str:
    if not gpu.nvml_available():
        return "none"
    return gpu.driver_version()


@lru_cache(maxsize=4)
def fingerprint(cache_dir: Path, gpu_model: str) -> dict:
    return {
        **{name.replace(".", "_"): _file_sha256(PROJECT_ROOT / name) for name in FIXED_FILES},
        "tokenizer": _tree_sha256(cache_dir / "tokenizer"),
        "manifest": _file_sha256(cache_dir / "manifest.json"),
        "val_shard": _file_sha256(cache_dir / "data" / VAL_SHARD),
        "gpu_model": gpu_model,
        "driver": _driver(),
        "torch": _torch_version(),
    }


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def digest(print_: dict) -> str:
    """A short name for a fingerprint: workers of one setup share a queue named by it."""
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:16]
