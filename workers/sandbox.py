"""What a train.py run by a worker can reach: its own user, its own folder, a cache without the
validation split. The environment it gets is workers.runner's allow-list.

Worker running as root (the demo, CI, most GPU boxes):
- train.py runs as SANDBOX_USER, a system user created on first use (as app/embedded.py does
  for Postgres), with its own group and no supplementary groups. It owns nothing of the
  worker's. The GPU device files (/dev/nvidia*) are world-accessible on standard driver
  installs, so it trains on the GPU like root would.
- Its working directory is the run directory, root-owned with the sticky bit and writable by
  all: train.py creates files there (a model artifact, scratch files) but cannot remove or
  rename what the worker put there (train.py, train.log), so it cannot swap them for symlinks
  that the worker, as root, would then follow. The folder above the run directory is closed to
  others (0700): `..` leads nowhere, and the run directory's absolute path does not resolve for
  train.py either. It works through relative paths from its working directory (the runner
  starts it as /proc/self/cwd/train.py), and so must any path the worker gives it. Anything the worker reads back from there was written by
  the agent's code: open it without following symlinks.
- AUTORESEARCH_CACHE names a view of the cache: a root-owned folder with the tokenizer, the
  training shards (hard links, or copies across filesystems: no symlinks, which would lead
  back into the real cache) and a manifest without the validation entries. The real cache's
  validation shard is also made unreadable to others, in case the real cache is reachable.
- HOME and the compile caches (torch inductor, triton) are a home folder of the sandbox user,
  shared by its runs, so compiled kernels stay warm from one run to the next.
- The interpreter must be runnable by that user: folders above it that others cannot pass
  through get the search bit (o+x), as app/embedded.py does for Postgres: others may then open
  the world-readable files in them by name, never list them. That is logged.

Worker not running as root: train.py runs as the worker's own user. It gets the same clean
environment and the same cache view, but the operating system lets it read whatever the worker
can: the real cache with its validation shard, the state folder, files holding credentials.
Only a root worker (or one whose user owns nothing else) gives the full sandbox.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from app.file_access import add_search_permission

log = logging.getLogger(__name__)

SANDBOX_USER = "autoresearch_run"
HOME_DIRNAME = "home"  # under the sandbox folder: the sandbox user's HOME
VIEWS_DIRNAME = "views"  # under the sandbox folder: one read-only cache view per cache content
# The cache layout prepare.py documents: what a view holds besides the training shards.
DATA_DIRNAME, TOKENIZER_DIRNAME, MANIFEST_FILENAME = "data", "tokenizer", "manifest.json"


# ---------------------------------------------------------------------------
# The user


def run_account() -> pwd.struct_passwd | None:
    """The account train.py runs as: SANDBOX_USER when we are root, else None (our own)."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SANDBOX_USER)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise RuntimeError(f"a root worker runs train.py as the unprivileged user {SANDBOX_USER!r}, and there is no "
                           f"useradd to create it: create that user, or run the worker as a non-root user")
    log.info("creating system user %s to run train.py", SANDBOX_USER)
    result = subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                             SANDBOX_USER], capture_output=True, text=True)
    try:
        return pwd.getpwnam(SANDBOX_USER)  # also fine when a concurrent useradd won the race
    except KeyError:
        raise RuntimeError(f"useradd {SANDBOX_USER} failed: {result.stderr.strip()}") from None


def account_env(account: pwd.struct_passwd | None, sandbox_dir: Path) -> dict[str, str]:
    """HOME and compile caches for train.py: the sandbox user's home when it runs as that user.

    The worker's own cache folders (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) belong to the
    worker's user: the sandbox user could not write them, and must not share them.
    """
    if account is None:
        return {}
    home = sandbox_dir / HOME_DIRNAME
    return {"HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(home / ".cache" / "torchinductor"),
            "TRITON_CACHE_DIR": str(home / ".cache" / "triton")}


def prepare_for_account(account: pwd.struct_passwd, run_dir: Path, sandbox_dir: Path) -> None:
    """Let `account` run train.py in run_dir, and nothing of the worker's beyond it (see above)."""
    _make_dir(sandbox_dir, 0o755)
    home = sandbox_dir / HOME_DIRNAME
    _make_dir(home, 0o700)
    os.chown(home, account.pw_uid, account.pw_gid)
    run_dir.parent.chmod(0o700)
    os.chown(run_dir, 0, 0)
    run_dir.chmod(0o1777)
    interpreter_reachable(Path(sys.executable))


def interpreter_reachable(python: Path) -> None:
    """Let SANDBOX_USER reach the interpreter that runs train.py (a venv under /root, say)."""
    add_search_permission(Path(os.path.realpath(python)).parent, so_that=f"{SANDBOX_USER} can run the interpreter")


def _make_dir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)


# ---------------------------------------------------------------------------
# The cache view


def cache_view(cache_dir: Path, sandbox_dir: Path) -> Path:
    """A folder laid out like cache_dir with its tokenizer and training split only.

    Built once per cache content (a view is named after the names, sizes and mtimes of what it
    holds, so a rebuilt cache gets a new one) and shared by every worker of the machine; a view
    is complete before it appears under its name. The real validation shard is made unreadable
    to others each time, since prepare.py may have written it again.
    """
    import prepare  # torch comes with it: imported only when a run needs a view

    cache_dir = Path(cache_dir)
    val_path = cache_dir / DATA_DIRNAME / prepare.VAL_FILENAME
    if val_path.exists() and os.geteuid() == 0:
        val_path.chmod(stat.S_IMODE(val_path.stat().st_mode) & ~0o077)
    shards = [Path(p) for p in prepare.split_paths("train", data_dir=str(cache_dir / DATA_DIRNAME))]
    tokenizer_files = sorted(p for p in (cache_dir / TOKENIZER_DIRNAME).iterdir() if p.is_file())
    manifest = _manifest_without_validation(cache_dir / MANIFEST_FILENAME)
    content = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for path in [*tokenizer_files, *shards]:
        st = path.stat()
        content.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    views = sandbox_dir / VIEWS_DIRNAME
    view = views / content.hexdigest()[:20]
    if view.is_dir():
        return view
    _make_dir(views, 0o755)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=views))
    try:
        for folder, files in ((TOKENIZER_DIRNAME, tokenizer_files), (DATA_DIRNAME, shards)):
            (building / folder).mkdir()
            for source in files:
                _link_or_copy(source, building / folder / source.name)
        (building / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for path in [building, *building.rglob("*")]:
            # A linked shard's mode is the cache's own: readable by all is added, writable by
            # others taken away (the sandbox user must not change the cache through its view).
            path.chmod(0o755 if path.is_dir() else (stat.S_IMODE(path.stat().st_mode) | 0o444) & ~0o022)
        try:
            building.rename(view)
        except OSError:  # another worker finished the same view first
            if not view.is_dir():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.info("cache view of %s at %s (%d training shards)", cache_dir, view, len(shards))
    return view


def _manifest_without_validation(path: Path) -> dict:
    """The cache's manifest with every key that describes the validation split left out."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.lower().startswith("val")}
        return value

    try:
        return strip(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link shares the file's inode, mode and owner: the view's reader gets no write
    # access it does not have to the cache's file. Across filesystems, a copy.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
