"""Transports: listen on and connect to address URIs, handing asyncio transports to protocols.

One tiny interface for every kind of address (``create_server``, ``create_connection``); the
asyncio shell never touches sockets itself. OS errors on connect become ``ConnectError`` naming
the address, so callers see *where* it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Callable
from typing import Any, Protocol

from vrpc.exceptions import ConnectError
from vrpc.transport.address import Address, parse_address
from vrpc.transport.memory import create_memory_connection, create_memory_server

__all__ = ["Address", "Listener", "create_connection", "create_server", "parse_address"]

ProtocolFactory = Callable[[], asyncio.Protocol]


class Listener(Protocol):
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...
    def is_serving(self) -> bool: ...


async def create_server(
    uri: str | Address, factory: ProtocolFactory, *, backlog: int = 1024
) -> Listener:
    addr = parse_address(uri)
    loop = asyncio.get_running_loop()
    if addr.scheme == "memory":
        return await create_memory_server(addr.path, factory)
    if addr.scheme == "unix":
        _remove_stale_socket(addr.path)
        return await loop.create_unix_server(factory, addr.path, backlog=backlog)
    if addr.scheme == "tcp":
        return await loop.create_server(factory, addr.host, addr.port, backlog=backlog)
    from vrpc.transport.vsock import create_vsock_server

    return await create_vsock_server(factory, addr.cid, addr.port, backlog=backlog)


def _remove_stale_socket(path: str) -> None:
    # A socket file left by a crashed server would make bind() fail; only ever remove sockets.
    if path.startswith("@"):
        return
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


async def create_connection(
    uri: str | Address, factory: ProtocolFactory
) -> tuple[asyncio.BaseTransport, Any]:
    addr = parse_address(uri)
    loop = asyncio.get_running_loop()
    try:
        if addr.scheme == "memory":
            return await create_memory_connection(addr.path, factory)
        if addr.scheme == "unix":
            return await loop.create_unix_connection(factory, addr.path)
        if addr.scheme == "tcp":
            return await loop.create_connection(factory, addr.host, addr.port)
        from vrpc.transport.vsock import create_vsock_connection

        return await create_vsock_connection(factory, addr.cid, addr.port)
    except ConnectError:
        raise
    except OSError as exc:
        raise ConnectError(f"{addr}: {exc.strerror or exc}") from exc
