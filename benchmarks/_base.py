"""The interface every benchmarked system implements, and small helpers shared by them.

Addresses are URIs: ``unix:///path`` everywhere, ``vsock://ANY:PORT`` (listen) and
``vsock://LOCAL:PORT`` (connect) inside the vsock lab VM only. Unix sockets go straight to the
event loop; vsock goes through ``vrpc.transport``, which knows the AF_UNIX re-wrap uvloop needs.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

# Raw and blocking echo frames: kind (1 byte) + payload length (4 bytes, big endian).
HEADER = struct.Struct(">BI")
KIND_ECHO = 0
KIND_STREAM = 1  # payload: item size, item count (two u32)
KIND_ITEM = 2
KIND_END = 3
STREAM_REQUEST = struct.Struct(">II")
MAX_MESSAGE = 64 * 1024 * 1024

Closer = Callable[[], Awaitable[None]]


class BenchClient(Protocol):
    """One connection to a benchmarked server."""

    async def echo(self, payload: bytes) -> bytes: ...

    async def stream(self, size: int, count: int) -> int:
        """Ask for ``count`` items of ``size`` bytes; return the number of bytes received."""
        ...

    async def close(self) -> None: ...


class System(Protocol):
    """What a system module provides (module-level functions)."""

    async def start_server(self, address: str) -> Closer:
        """Listen on ``address``; return a coroutine function that stops the server."""
        ...

    async def open_client(self, address: str) -> BenchClient: ...


def unix_path(address: str) -> str | None:
    """The path of a ``unix://`` address, or ``None`` for any other scheme."""
    return address[len("unix://") :] if address.startswith("unix://") else None


async def listen(address: str, factory: Callable[[], asyncio.Protocol]) -> Closer:
    """Serve ``factory`` protocols on ``address``; return the coroutine function closing it."""
    path = unix_path(address)
    if path is not None:
        server: Any = await asyncio.get_running_loop().create_unix_server(
            factory, path, backlog=1024
        )
    else:
        from vrpc.transport import create_server

        server = await create_server(address, factory)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


async def connect(address: str, factory: Callable[[], Any]) -> tuple[Any, Any]:
    """Connect a ``factory`` protocol to ``address``; return ``(transport, protocol)``."""
    path = unix_path(address)
    if path is None:
        from vrpc.transport import create_connection

        return await create_connection(address, factory)
    loop = asyncio.get_running_loop()
    for _ in range(1000):  # bounded; a Unix listener answers EAGAIN while its backlog is full
        try:
            return await loop.create_unix_connection(factory, path)
        except BlockingIOError:
            await asyncio.sleep(0.001)
    raise ConnectionError(f"{path}: the listener's backlog stayed full")
