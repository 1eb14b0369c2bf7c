"""An in-process transport pair for tests: ``memory://name`` addresses.

Bytes written on one side are delivered to the other side's protocol on the next loop tick, in
order, like a socket without a kernel. Listeners are looked up by name in a table owned by this
module; an unknown name refuses the connection like a closed port.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

from vrpc.exceptions import ConnectError

__all__ = ["MemoryServer", "MemoryTransport", "create_memory_connection", "create_memory_server"]

_listeners: dict[str, MemoryServer] = {}
_BARE = contextvars.Context()


class MemoryTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, role: str) -> None:
        super().__init__({"peername": f"memory://{name}#{role}", "sockname": name})
        self._loop = loop
        self._protocol: asyncio.Protocol | None = None
        self.peer: MemoryTransport | None = None
        self._closing = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self.peer is None:
            return
        # Like a socket, delivery carries no context from the writer to the reader.
        self._loop.call_soon(self.peer._deliver, bytes(data), context=_BARE)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # delivery is immediate: nothing accumulates on this side

    def _deliver(self, data: bytes) -> None:
        if not self._closing and self._protocol is not None:
            self._protocol.data_received(data)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._lost, context=_BARE)
        if self.peer is not None and not self.peer._closing:
            # Queued after the bytes already written, as a socket's FIN follows its data: the
            # peer reads everything we sent (a handshake alert, say) before it sees the close.
            self._loop.call_soon(self.peer._peer_closed, context=_BARE)

    def abort(self) -> None:
        self.close()

    def _peer_closed(self) -> None:
        if not self._closing:
            self._closing = True
            self._lost()

    def _lost(self) -> None:
        if self._protocol is not None:
            self._protocol.connection_lost(None)


class MemoryServer:
    def __init__(self, name: str, factory: Callable[[], asyncio.Protocol]) -> None:
        self.name = name
        self._factory = factory
        self._serving = True

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        self._serving = False
        if _listeners.get(self.name) is self:
            del _listeners[self.name]

    async def wait_closed(self) -> None:
        return None


async def create_memory_server(name: str, factory: Callable[[], asyncio.Protocol]) -> MemoryServer:
    if name in _listeners:
        raise OSError(f"memory://{name} is already in use")
    server = _listeners[name] = MemoryServer(name, factory)
    return server


async def create_memory_connection(
    name: str, factory: Callable[[], asyncio.Protocol]
) -> tuple[MemoryTransport, asyncio.Protocol]:
    server = _listeners.get(name)
    if server is None or not server.is_serving():
        raise ConnectError(f"memory://{name}: connection refused (nothing listens there)")
    loop = asyncio.get_running_loop()
    client_t = MemoryTransport(loop, name, "client")
    server_t = MemoryTransport(loop, name, "server")
    client_t.peer, server_t.peer = server_t, client_t
    client_p = factory()
    server_p = server._factory()
    client_t.set_protocol(client_p)
    server_t.set_protocol(server_p)
    server_p.connection_made(server_t)
    client_p.connection_made(client_t)
    return client_t, client_p
