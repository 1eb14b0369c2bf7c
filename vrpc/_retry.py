"""Retry with backoff, written once: the client retries a call on one server, the pool moves it
to another endpoint; both go through ``retrying``."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import structlog

from vrpc.exceptions import RpcError

__all__ = ["backoff_delays", "retrying"]

log = structlog.get_logger("vrpc.client")
R = TypeVar("R")


def backoff_delays(first: float = 0.05, cap: float = 1.0) -> Iterator[float]:
    """Exponential delays with full jitter in [d/2, d): many clients that lost the same server
    do not come back in lockstep."""
    delay = first
    while True:
        yield delay * (0.5 + random.random() / 2)
        delay = min(delay * 2, cap)


async def retrying(
    attempt: Callable[[int], Awaitable[R]],
    *,
    attempts: int,
    deadline: float | None,
    retry_on: Callable[[RpcError], bool],
    what: str,
) -> R:
    """Run ``attempt(0)``, ``attempt(1)``, ... until one succeeds, an error is not retryable,
    ``attempts`` are used up, or the next try would start after ``deadline`` (monotonic)."""
    delays = backoff_delays(first=0.02, cap=0.5)
    for n in range(attempts):
        try:
            return await attempt(n)
        except RpcError as exc:
            if n + 1 >= attempts or not retry_on(exc):
                raise
            delay = next(delays)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise
            log.info("retrying call", method=what, reason=exc.message, attempt=n + 2)
            await asyncio.sleep(delay)
    raise ValueError("attempts must be at least 1")
