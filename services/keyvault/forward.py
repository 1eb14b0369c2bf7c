"""The in-enclave forward: a loopback TCP listener relaying each connection to the parent.

An enclave has no network interface, only vsock. KMS is reached through ``vsock-proxy`` on the
parent (vsock port 8000 by convention), which opens a TCP connection to
``kms.REGION.amazonaws.com:443``. Code in the enclave speaks plain TCP (+TLS) to
``127.0.0.1:8000``; this forward carries the bytes to ``vsock://3:8000`` unchanged, TLS included.

The listener starts on first use (inside the running event loop) and serves only loopback.
Everything is bounded: connections at once, and each copy loop reads at most 64 KiB at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
from collections.abc import Awaitable, Callable

import structlog

__all__ = [
    "Connector",
    "EnclaveForward",
    "ensure_loopback_up",
    "pipe",
    "tcp_connector",
    "vsock_connector",
]

log = structlog.get_logger("vrpc.keyvault.forward")

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

_CHUNK = 64 * 1024
_MAX_CONNECTIONS = 32


def tcp_connector(host: str, port: int) -> Connector:
    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port)

    return connect


def vsock_connector(cid: int, port: int) -> Connector:
    """Connect to ``vsock://cid:port`` through vrpc's vsock transport (stdlib or uvloop)."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from vrpc.transport.vsock import create_vsock_connection

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await create_vsock_connection(lambda: protocol, cid, port)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer

    return connect


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side (so TLS close_notify gets through)."""
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, asyncio.IncompleteReadError):
        writer.close()


class EnclaveForward:
    """``127.0.0.1:port`` -> ``connector()``; also a ``kms.Route`` (``address()``)."""

    def __init__(self, connector: Connector, *, port: int, host: str = "127.0.0.1") -> None:
        self._connector = connector
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._start_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(_MAX_CONNECTIONS)

    async def address(self) -> tuple[str, int]:
        await self.start()
        return self._host, self._port

    async def start(self) -> None:
        async with self._start_lock:
            if self._server is not None:
                return
            if self._host == "127.0.0.1":
                ensure_loopback_up()
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
            sock = self._server.sockets[0]
            self._port = sock.getsockname()[1]  # port 0 in tests picks a free one
            log.info("forward listening", host=self._host, port=self._port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            log.warning("forward busy, connection refused", limit=_MAX_CONNECTIONS)
            writer.close()
            return
        async with self._slots:
            try:
                up_reader, up_writer = await self._connector()
            except Exception as exc:  # any connect failure: drop this client only
                log.warning("forward upstream connect failed", error=type(exc).__name__)
                writer.close()
                return
            try:
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
            finally:
                for w in (writer, up_writer):
                    w.close()
                    with contextlib.suppress(OSError):
                        await w.wait_closed()


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH14x")


def ensure_loopback_up(name: str = "lo") -> bool:
    """Bring the loopback interface up if it is down; returns True if it had to.

    A Nitro enclave boots with ``lo`` down, so nothing could listen on 127.0.0.1. Done with the
    ``SIOCGIFFLAGS``/``SIOCSIFFLAGS`` ioctls rather than ``ip link`` so the image needs no
    iproute2. The kernel assigns 127.0.0.1/8 when loopback comes up. Where ``lo`` is up already
    (any ordinary machine) this only reads the flags.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(name.encode(), 0)
        flags = _IFREQ.unpack(fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
        if flags & _IFF_UP:
            return False
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | _IFF_UP))
        log.info("loopback interface brought up", interface=name)
        return True
