"""grpcio's asyncio API with raw bytes: generic handlers, no (de)serializers, no protobuf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from benchmarks._base import MAX_MESSAGE, STREAM_REQUEST, Closer, unix_path

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    size, count = STREAM_REQUEST.unpack(request)
    item = b"\x5a" * size
    for _ in range(count):
        yield item


def _target(address: str) -> str:
    path = unix_path(address)
    if path is None:
        raise ValueError(f"grpc-aio runs over Unix sockets only, not {address}")
    return f"unix:{path}"


async def start_server(address: str) -> Closer:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        },
    )
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(_target(address))
    await server.start()

    async def close() -> None:
        await server.stop(grace=None)

    return close


class GrpcClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self._echo = channel.unary_unary("/bench.Echo/Echo")
        self._stream = channel.unary_stream("/bench.Echo/Stream")

    async def echo(self, payload: bytes) -> bytes:
        result: bytes = await self._echo(payload)
        return result

    async def stream(self, size: int, count: int) -> int:
        total = 0
        async for item in self._stream(STREAM_REQUEST.pack(size, count)):
            total += len(item)
        return total

    async def close(self) -> None:
        await self.channel.close()


async def open_client(address: str) -> GrpcClient:
    # A private subchannel pool: otherwise a new channel reuses another's connection and the
    # handshake case would measure nothing.
    options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channel = grpc.aio.insecure_channel(_target(address), options=options)
    await channel.channel_ready()
    return GrpcClient(channel)
