"""Many calls of every kind leave nothing behind: tasks, pending tables, connections."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import vrpc


class Leaky(vrpc.Service, name="leaky.v1"):
    @vrpc.rpc
    async def ok(self, n: int) -> int: ...

    @vrpc.rpc
    async def fail(self) -> None: ...

    @vrpc.rpc
    async def hang(self) -> None: ...

    @vrpc.rpc
    def items(self, n: int) -> AsyncIterator[int]: ...

    @vrpc.rpc
    async def total(self, items: AsyncIterator[int]) -> int: ...


class LeakyImpl(Leaky):
    async def ok(self, n: int) -> int:
        return n

    async def fail(self) -> None:
        raise vrpc.RpcError(vrpc.Status.ABORTED, "no")

    async def hang(self) -> None:
        await asyncio.Event().wait()

    async def items(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def total(self, items: AsyncIterator[int]) -> int:
        return sum([i async for i in items])


async def _mixed_round(stub: Leaky) -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(5):
            yield i

    assert await stub.ok(1) == 1
    with pytest.raises(vrpc.RpcError):
        await stub.fail()
    with pytest.raises(vrpc.RpcError), vrpc.call_options(timeout=0.001):
        await stub.hang()
    task = asyncio.create_task(stub.hang())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [i async for i in stub.items(3)] == [0, 1, 2]
    stream = stub.items(100)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert await stub.total(numbers()) == 10


async def _settle(server: vrpc.Server) -> None:
    for _ in range(400):
        if server.calls_in_flight == 0:
            break
        await asyncio.sleep(0.005)
    for _ in range(5):
        await asyncio.sleep(0)


async def test_many_calls_return_to_baseline(serve: Callable[..., Any], uri: str) -> None:
    async with serve(uri, [LeakyImpl()]) as (server, client):
        stub = client.stub(Leaky)
        await _mixed_round(stub)
        await _settle(server)
        baseline_tasks = len(asyncio.all_tasks())
        for _ in range(30):
            await asyncio.gather(*(_mixed_round(stub) for _ in range(5)))
        await _settle(server)
        assert server.calls_in_flight == 0
        assert len(asyncio.all_tasks()) == baseline_tasks
        proto = client._proto
        assert proto is not None
        assert proto.pending == {}
        assert proto.conn.calls_in_flight == 0
        (server_proto,) = server._connections
        assert server_proto.tasks == {}
        assert server_proto.inbound == {}
        assert server_proto.credit_gates == {}
        assert server_proto.conn.calls_in_flight == 0
        # deadlines of finished calls may wait in the heap, but only until they expire
        assert len(proto.conn._deadlines) <= 5 * 31


async def test_closed_connections_are_released(
    server_at: Callable[..., Any], new_client: Callable[..., vrpc.Client]
) -> None:
    uri = "memory://leaks-conns"
    async with server_at(uri, [LeakyImpl()]) as server:
        refs: list[weakref.ref[Any]] = []
        for _ in range(20):
            async with new_client(uri) as client:
                stub = client.stub(Leaky)
                await _mixed_round(stub)
                assert client._proto is not None
                refs.append(weakref.ref(client._proto))
        for _ in range(400):
            if server.connection_count == 0:
                break
            await asyncio.sleep(0.005)
        assert server.connection_count == 0
        await _settle(server)
        gc.collect()
        alive = [r for r in refs if r() is not None]
        assert len(alive) <= 1, alive
