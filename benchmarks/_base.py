"""The interface every benchmarked system implements, and small helpers shared by them."""

from __future__ import annotations

import asyncio
import struct
from typing import Protocol

# Raw and blocking echo frames: kind (1 byte) + payload length (4 bytes, big endian).
HEADER = struct.Struct(">BI")
KIND_ECHO = 0
KIND_STREAM = 1  # payload: item size, item count (two u32)
KIND_ITEM = 2
KIND_END = 3
STREAM_REQUEST = struct.Struct(">II")
MAX_MESSAGE = 64 * 1024 * 1024


class BenchClient(Protocol):
    """One connection to a benchmarked server."""

    async def echo(self, payload: bytes) -> bytes: ...

    async def stream(self, size: int, count: int) -> int:
        """Ask for ``count`` items of ``size`` bytes; return the number of bytes received."""
        ...

    async def close(self) -> None: ...


class System(Protocol):
    """What a system module provides (module-level functions)."""

    async def serve(self, path: str, stop: asyncio.Event) -> None: ...

    async def open_client(self, path: str) -> BenchClient: ...
