"""The profile names that prepare.py defines, read without importing it.

prepare.py owns the constants of each profile; importing it would pull torch into the API
and into Celery's parent process (where CUDA must never be touched before fork), so the keys
of its PROFILES dict are read from the source instead.
"""

from __future__ import annotations

import ast
from functools import lru_cache

from app.config import PROJECT_ROOT
from app.errors import InvalidInput


@lru_cache(maxsize=1)
def profile_names() -> tuple[str, ...]:
    tree = ast.parse((PROJECT_ROOT / "prepare.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "PROFILES" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return tuple(ast.literal_eval(key) for key in node.value.keys)
    raise RuntimeError("prepare.py defines no PROFILES dict")


def check_profile(name: str) -> str:
    if name not in profile_names():
        raise InvalidInput(
            f"unknown profile '{name}'; choose one of: {', '.join(profile_names())}", fields={"profile": name}
        )
    return name
