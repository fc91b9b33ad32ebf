"""Whether the Redis broker answers: for /health, and before a command starts processes that
need it (a worker would otherwise retry for ever instead of saying what is wrong)."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis

from app.config import ServerUnreachable

BROKER_TIMEOUT_S = 5


def ping_broker(url: str, timeout_s: float = BROKER_TIMEOUT_S) -> None:
    """Raises the redis client's error when the broker does not answer."""
    redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping()


def check_broker(url: str) -> None:
    try:
        ping_broker(url)
    except redis.RedisError as exc:
        parts = urlsplit(url)
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        raise ServerUnreachable(
            f"CELERY_BROKER_URL: cannot use the Redis broker at {where} ({exc}); "
            "start Redis there or point CELERY_BROKER_URL at a server that runs"
        ) from None
