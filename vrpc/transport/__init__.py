"""Transports: listen on and connect to address URIs, handing asyncio transports to protocols.

One tiny interface for every kind of address (``create_server``, ``create_connection``); the
asyncio shell never touches sockets itself. OS errors on connect become ``ConnectError`` naming
the address, so callers see *where* it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from typing import Any, Protocol

from vrpc.exceptions import ConnectError
from vrpc.transport.address import Address, parse_address
from vrpc.transport.memory import create_memory_connection, create_memory_server

__all__ = [
    "Address",
    "Listener",
    "create_connection",
    "create_server",
    "describe_peer",
    "parse_address",
]

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
        _claim_unix_path(addr.path)
        server = await loop.create_unix_server(factory, addr.path, backlog=backlog)
        return _UnixListener(server, addr.path)
    if addr.scheme == "tcp":
        return await loop.create_server(factory, addr.host, addr.port, backlog=backlog)
    from vrpc.transport.vsock import create_vsock_server

    return await create_vsock_server(factory, addr.cid, addr.port, backlog=backlog)


def _claim_unix_path(path: str) -> None:
    """Make ``path`` bindable without taking it from a live server.

    A socket file left by a crashed server would make bind() fail, so a stale one is removed; but
    unlinking the socket of a server that is still running would leave it listening, unreachable,
    while we take over its address. So the file is probed first: a connect that succeeds (or finds
    the backlog full) means a live server, and the path is refused; ECONNREFUSED means nobody
    listens, and only then is the file removed. Only sockets are ever removed.
    """
    if path.startswith("@"):
        return  # abstract namespace: no file, and bind() itself refuses a live name
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # not ours to remove: bind() reports the conflict
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)  # a unix connect completes or fails at once; never wait
        code = probe.connect_ex(path)
    finally:
        probe.close()
    if code in (0, errno.EAGAIN, errno.EWOULDBLOCK):
        raise OSError(
            errno.EADDRINUSE,
            f"unix://{path}: another server is listening on this socket; "
            "refusing to take it over (stop it first, or choose another path)",
        )
    if code == errno.ECONNREFUSED:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    elif code != errno.ENOENT:
        raise OSError(code, f"unix://{path}: cannot probe the existing socket: {os.strerror(code)}")


class _UnixListener:
    """A unix-socket server that removes its own socket file when closed.

    Only the file it created is removed: if the path now holds another file (a successor that
    took over a stale path), that one is left alone.
    """

    def __init__(self, server: asyncio.AbstractServer, path: str) -> None:
        self._server = server
        self._path = path
        self._identity = _file_identity(path)

    def close(self) -> None:
        self._server.close()
        if self._identity is not None and _file_identity(self._path) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        self._identity = None

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    def is_serving(self) -> bool:
        return self._server.is_serving()


def _file_identity(path: str) -> tuple[int, int] | None:
    if path.startswith("@"):
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


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


def describe_peer(transport: asyncio.BaseTransport) -> str:
    """The peer's address for logs: ``vsock://CID:PORT`` for vsock, else the socket's own."""
    from vrpc.transport.vsock import peer_address

    # On uvloop's AF_UNIX route for vsock, peername is a mangled path: ask the kernel.
    vsock_peer = peer_address(transport)
    if vsock_peer is not None:
        return f"vsock://{vsock_peer[0]}:{vsock_peer[1]}"
    peer = transport.get_extra_info("peername")
    return str(peer) if peer else str(transport.get_extra_info("sockname"))
