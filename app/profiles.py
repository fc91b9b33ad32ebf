"""The profile names a tag may pick, from the project's profile table (run_profiles.py).

The table sits in a module of its own, apart from prepare.py, because prepare.py imports torch:
the API and Celery's parent process must never do that (CUDA does not survive fork).
"""

from __future__ import annotations

from app.errors import InvalidInput
from run_profiles import PROFILES


def check_profile(name: str) -> str:
    if name not in PROFILES:
        raise InvalidInput(
            f"unknown profile '{name}'; choose one of: {', '.join(PROFILES)}", fields={"profile": name}
        )
    return name
