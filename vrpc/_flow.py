"""An awaitable gate: what a sender waits on (the transport's write buffer, a stream's credit)."""

from __future__ import annotations

import asyncio

__all__ = ["FlowGate"]


class FlowGate:
    """An awaitable gate for a sender (transport write buffer, stream credit)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._event.set()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()

    def open(self) -> None:
        self._event.set()

    def close(self) -> None:
        self._event.clear()

    async def wait(self) -> None:
        await self._event.wait()
