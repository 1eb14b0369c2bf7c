"""The thinnest asyncio echo: an ``asyncio.Protocol`` with a length prefix, no codec, no crypto.

It is the ceiling a Python asyncio RPC can approach on one connection: the server echoes every
complete frame back in a single write per ``data_received``; the client coalesces the frames of
one loop tick into one write, as vrpc does.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

from benchmarks._base import (
    HEADER,
    KIND_ECHO,
    KIND_END,
    KIND_ITEM,
    KIND_STREAM,
    MAX_MESSAGE,
    STREAM_REQUEST,
    Closer,
    connect,
    listen,
)

_HLEN = HEADER.size


class _ServerProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, do not check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * MAX_MESSAGE)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = len(buf)
        if end >= _HLEN:
            kind, size = HEADER.unpack_from(buf, 0)
            if kind == KIND_ECHO and end == _HLEN + size:
                # Exactly one frame buffered (the common case): send the buffer itself.
                self.buf = bytearray()
                assert self.transport is not None
                self.transport.write(buf)
                return
        pos = 0
        out: list[bytes | bytearray] = []
        while end - pos >= _HLEN:
            kind, size = HEADER.unpack_from(buf, pos)
            if size > MAX_MESSAGE:
                assert self.transport is not None
                self.transport.abort()
                return
            stop = pos + _HLEN + size
            if stop > end:
                break
            if kind == KIND_ECHO:
                out.append(buf[pos:stop])
            elif kind == KIND_STREAM:
                item_size, count = STREAM_REQUEST.unpack_from(buf, pos + _HLEN)
                item = HEADER.pack(KIND_ITEM, item_size) + b"\x5a" * item_size
                out.extend([item] * count)
                out.append(HEADER.pack(KIND_END, 0))
            pos = stop
        if pos:
            del buf[:pos]
        if out:
            assert self.transport is not None
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.outgoing: list[bytes] = []
        self.streamed = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, do not check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * MAX_MESSAGE)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= _HLEN:
            kind, size = HEADER.unpack_from(buf, pos)
            stop = pos + _HLEN + size
            if stop > end:
                break
            if kind == KIND_ECHO:
                if pos == 0 and stop == end:
                    # The buffer holds exactly this frame: hand it over without a copy.
                    self.buf = bytearray()
                    self.waiters.popleft().set_result(memoryview(buf)[_HLEN:])
                    return
                self.waiters.popleft().set_result(buf[pos + _HLEN : stop])
            elif kind == KIND_ITEM:
                self.streamed += size
            else:
                total, self.streamed = self.streamed, 0
                self.waiters.popleft().set_result(total.to_bytes(8, "big"))
            pos = stop
        if pos:
            del buf[:pos]

    def _send(self, frame: bytes) -> asyncio.Future[Any]:
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outgoing.append(frame)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return fut

    def _flush(self) -> None:
        frames, self.outgoing = self.outgoing, []
        assert self.transport is not None
        self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))


class RawClient:
    def __init__(self, transport: asyncio.Transport, protocol: _ClientProtocol) -> None:
        self.transport = transport
        self.protocol = protocol

    async def echo(self, payload: bytes) -> bytes | bytearray | memoryview:
        result: bytes | bytearray | memoryview = await self.protocol._send(
            HEADER.pack(KIND_ECHO, len(payload)) + payload
        )
        return result

    async def stream(self, size: int, count: int) -> int:
        request = HEADER.pack(KIND_STREAM, STREAM_REQUEST.size) + STREAM_REQUEST.pack(size, count)
        return int.from_bytes(await self.protocol._send(request), "big")

    async def close(self) -> None:
        self.transport.close()
        await self.protocol.lost


async def start_server(address: str) -> Closer:
    return await listen(address, _ServerProtocol)


async def open_client(address: str) -> RawClient:
    transport, protocol = await connect(address, _ClientProtocol)
    return RawClient(transport, protocol)


__all__ = ["RawClient", "open_client", "start_server"]
