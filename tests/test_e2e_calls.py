"""Call semantics end to end: streaming, flow control, deadlines, cancellation, metadata,
limits, interceptors, drain, reconnect, retries, pools and metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import vrpc
from vrpc.proto.connection import INITIAL_WINDOW
from vrpc.transport import create_connection

Serve = Callable[..., Any]
BLOB = 16 * 1024


class Calls(vrpc.Service, name="calls.v1"):
    @vrpc.rpc
    def count(self, n: int) -> AsyncIterator[int]: ...

    @vrpc.rpc
    def blobs(self, n: int) -> AsyncIterator[bytes]: ...

    @vrpc.rpc
    def fail_after(self, n: int) -> AsyncIterator[int]: ...

    @vrpc.rpc
    async def total(self, items: AsyncIterator[int]) -> int: ...

    @vrpc.rpc
    async def slow_total(self, items: AsyncIterator[bytes]) -> int: ...

    @vrpc.rpc
    def doubler(self, items: AsyncIterator[int]) -> AsyncIterator[int]: ...

    @vrpc.rpc
    async def hold(self) -> str: ...

    @vrpc.rpc(timeout=0.05)
    async def hold_briefly(self) -> str: ...

    @vrpc.rpc
    async def remaining(self) -> float | None: ...

    @vrpc.rpc
    async def nested(self) -> float | None: ...

    @vrpc.rpc
    async def meta(self) -> dict[str, Any]: ...

    @vrpc.rpc
    async def big(self, size: int) -> bytes: ...

    @vrpc.rpc
    async def sink(self, data: bytes) -> int: ...

    @vrpc.rpc(idempotent=True)
    async def flaky(self, failures: int) -> int: ...

    @vrpc.rpc
    async def flaky_once(self, failures: int) -> int: ...


class CallsImpl(Calls):
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.started = 0
        self.started_event = asyncio.Event()
        self.cancelled = 0
        self.cancelled_event = asyncio.Event()
        self.release = asyncio.Event()
        self.produced = 0
        self.stream_closed = asyncio.Event()
        self.attempts = 0
        self.nested_client: vrpc.Client | None = None
        self.handled = 0

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def blobs(self, n: int) -> AsyncIterator[bytes]:
        try:
            for i in range(n):
                self.produced += 1
                yield bytes([i % 256]) * BLOB
        finally:
            self.stream_closed.set()

    async def fail_after(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise vrpc.RpcError(vrpc.Status.ABORTED, "stream broke", {"after": n})

    async def total(self, items: AsyncIterator[int]) -> int:
        return sum([i async for i in items])

    async def slow_total(self, items: AsyncIterator[bytes]) -> int:
        stream: Any = items
        self.started += 1
        self.started_event.set()
        await self.release.wait()
        self.max_buffered = stream.buffered_bytes
        return sum([len(i) async for i in items])

    async def doubler(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        async for i in items:
            yield 2 * i

    async def hold(self) -> str:
        self.started += 1
        self.started_event.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancelled_event.set()
            raise
        return f"released {self.name}"

    async def hold_briefly(self) -> str:
        return await self.hold()

    async def remaining(self) -> float | None:
        return vrpc.current_call().time_remaining()

    async def nested(self) -> float | None:
        assert self.nested_client is not None
        result: float | None = await self.nested_client.stub(Calls).remaining()
        return result

    async def meta(self) -> dict[str, Any]:
        call = vrpc.current_call()
        call.send_headers({"h": 1})
        call.set_trailer("t", "two")
        return dict(call.metadata)

    async def big(self, size: int) -> bytes:
        return b"x" * size

    async def sink(self, data: bytes) -> int:
        self.handled += 1
        return len(data)

    async def flaky(self, failures: int) -> int:
        self.attempts += 1
        if self.attempts <= failures:
            raise vrpc.RpcError(vrpc.Status.UNAVAILABLE, "try again")
        return self.attempts

    async def flaky_once(self, failures: int) -> int:
        return await self.flaky(failures)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a condition that another task makes true; bounded in count, never a timing check."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def wait_for(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, 5)


# ---------------------------------------------------------------------------- streaming


async def test_server_client_and_bidi_streaming(serve: Serve, uri: str) -> None:
    async with serve(uri, [CallsImpl()]) as (_, client):
        calls = client.stub(Calls)
        assert [i async for i in calls.count(100)] == list(range(100))
        assert [i async for i in calls.count(0)] == []

        async def numbers(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

        assert await calls.total(numbers(1000)) == sum(range(1000))
        assert await calls.total(numbers(0)) == 0
        assert [i async for i in calls.doubler(numbers(50))] == [2 * i for i in range(50)]


async def test_stream_error_reaches_the_client_after_the_items(serve: Serve, uri: str) -> None:
    async with serve(uri, [CallsImpl()]) as (_, client):
        got: list[int] = []
        with pytest.raises(vrpc.RpcError) as info:
            async for i in client.stub(Calls).fail_after(3):
                got.append(i)  # noqa: PERF401 - the items before the error are the point
        assert got == [0, 1, 2]
        assert info.value.status is vrpc.Status.ABORTED
        assert info.value.details == {"after": 3}


async def test_client_leaving_a_stream_stops_the_producer(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl]) as (server, client):
        stream = client.stub(Calls).blobs(10_000)
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await wait_for(impl.stream_closed.wait())
        assert impl.produced < 10_000
        await until(lambda: server.calls_in_flight == 0, "handler finished")
        assert await client.stub(Calls).remaining() is None


async def test_request_stream_failure_cancels_the_call(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl]) as (server, client):

        async def broken() -> AsyncIterator[int]:
            yield 1
            raise ValueError("source failed")

        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).total(broken())
        assert info.value.status is vrpc.Status.CANCELLED
        await until(lambda: server.calls_in_flight == 0, "handler cancelled")


async def test_invalid_stream_item_is_invalid_argument(serve: Serve) -> None:
    async with serve("memory://items", [CallsImpl()]) as (_, client):

        async def bad() -> AsyncIterator[Any]:
            yield 1
            yield "two"

        with pytest.raises(vrpc.RpcError) as info:
            async for _ in client.stream(
                "calls.v1.total", [], request=bad(), stream_response=False
            ):
                pass
        assert info.value.status is vrpc.Status.INVALID_ARGUMENT


# ---------------------------------------------------------------------------- flow control


async def test_slow_consumer_blocks_the_server_producer(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    n = 4 * INITIAL_WINDOW // BLOB
    async with serve(uri, [impl]) as (server, client):
        stream = client.stub(Calls).blobs(n)
        first = await stream.__anext__()  # type: ignore[attr-defined]
        assert len(first) == BLOB
        proto = client._proto
        assert proto is not None
        (pending,) = proto.pending.values()
        (server_proto,) = server._connections
        (server_call,) = server_proto.conn._calls.values()
        await until(lambda: server_call.send_credit <= 0, "server out of credit")
        # the producer is parked: more loop turns produce nothing more
        produced = impl.produced
        for _ in range(20):
            await asyncio.sleep(0)
        assert impl.produced == produced < n
        assert pending.items is not None
        buffered = sum(size for _, size in pending.items._queue)  # type: ignore[attr-defined]
        assert 0 < buffered <= INITIAL_WINDOW + BLOB + 64
        rest = [item async for item in stream]
        assert len(rest) == n - 1
        assert [r[0] for r in rest] == [i % 256 for i in range(1, n)]


async def test_slow_handler_blocks_the_client_sender(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    n = 4 * INITIAL_WINDOW // BLOB
    sent = 0

    async def blobs() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(n):
            sent += 1
            yield b"y" * BLOB

    async with serve(uri, [impl]) as (server, client):
        task = asyncio.create_task(client.stub(Calls).slow_total(blobs()))
        await wait_for(impl.started_event.wait())
        proto = client._proto
        assert proto is not None
        (call,) = proto.conn._calls.values()
        await until(lambda: call.send_credit <= 0, "client out of credit")
        (server_proto,) = server._connections
        (stream,) = server_proto.inbound.values()
        await until(lambda: stream.buffered_bytes > INITIAL_WINDOW - BLOB, "items delivered")
        assert sent < n
        assert stream.buffered_bytes <= INITIAL_WINDOW + BLOB + 64
        impl.release.set()
        assert await wait_for(task) == n * BLOB


# ---------------------------------------------------------------------------- deadlines


async def test_call_options_deadline(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl]) as (server, client):
        with pytest.raises(vrpc.RpcError) as info, vrpc.call_options(timeout=0.05):
            await client.stub(Calls).hold()
        assert info.value.status is vrpc.Status.DEADLINE_EXCEEDED
        await wait_for(impl.cancelled_event.wait())  # the handler saw CancelledError
        await until(lambda: server.calls_in_flight == 0, "handler gone")
        assert server.metrics.snapshot()["calls.v1.hold"]["statuses"] == {"CANCELLED": 1}


async def test_method_default_deadline(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl]) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).hold_briefly()
        assert info.value.status is vrpc.Status.DEADLINE_EXCEEDED
        await wait_for(impl.cancelled_event.wait())


async def test_client_default_deadline(serve: Serve) -> None:
    impl = CallsImpl()
    async with serve("memory://client-deadline", [impl], timeout=0.05) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).hold()
        assert info.value.status is vrpc.Status.DEADLINE_EXCEEDED
        await wait_for(impl.cancelled_event.wait())
        # call options override the client default
        with vrpc.call_options(timeout=30):
            remaining = await client.stub(Calls).remaining()
        assert remaining is not None and 0.05 < remaining <= 30


async def test_deadline_on_a_stream(serve: Serve) -> None:
    impl = CallsImpl()
    async with serve("memory://stream-deadline", [impl]) as (_, client):
        got = 0
        with pytest.raises(vrpc.RpcError) as info, vrpc.call_options(timeout=0.1):
            async for _ in client.stub(Calls).blobs(10**6):
                got += 1
                await asyncio.sleep(0.01)
        assert info.value.status is vrpc.Status.DEADLINE_EXCEEDED
        await wait_for(impl.stream_closed.wait())


async def test_remaining_time_and_nested_calls_inherit_the_deadline(
    serve: Serve, new_client: Callable[..., vrpc.Client]
) -> None:
    impl = CallsImpl()
    uri = "memory://nested"
    async with serve(uri, [impl]) as (_, client):
        calls = client.stub(Calls)
        assert await calls.remaining() is None
        with vrpc.call_options(timeout=20):
            remaining = await calls.remaining()
        assert remaining is not None and 0 < remaining <= 20
        async with new_client(uri) as inner:
            impl.nested_client = inner
            assert await calls.nested() is None
            with vrpc.call_options(timeout=20):
                nested = await calls.nested()
            assert nested is not None and 0 < nested <= 20


# ---------------------------------------------------------------------------- cancellation


async def test_cancelling_the_caller_cancels_the_handler(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl]) as (server, client):
        task = asyncio.create_task(client.stub(Calls).hold())
        await wait_for(impl.started_event.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(impl.cancelled_event.wait())
        await until(lambda: server.calls_in_flight == 0, "handler gone")
        assert await client.stub(Calls).remaining() is None  # the connection is fine


async def test_client_disconnect_cancels_all_its_handlers(
    serve: Serve, new_client: Callable[..., vrpc.Client], uri: str
) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl]) as (server, client):
        other = client.stub(Calls)
        doomed = new_client(uri)
        await doomed.connect()
        tasks = [asyncio.create_task(doomed.stub(Calls).hold()) for _ in range(3)]
        await until(lambda: impl.started == 3, "three handlers running")
        await doomed.close()
        await until(lambda: impl.cancelled == 3, "handlers cancelled")
        for task in tasks:
            with pytest.raises(vrpc.RpcError) as info:
                await wait_for(task)
            # Refused visibly by the server before it answered our CLOSE with its own.
            assert info.value.status is vrpc.Status.CANCELLED
            assert info.value.message == "the client closed the connection"
        await until(lambda: server.connection_count == 1, "connection forgotten")
        assert server.calls_in_flight == 0
        assert await other.remaining() is None


# ---------------------------------------------------------------------------- metadata


async def test_metadata_headers_and_trailers(serve: Serve, uri: str) -> None:
    async with serve(uri, [CallsImpl()]) as (_, client):
        with vrpc.call_options(metadata={"token": "abc", "n": 2}) as options:
            result = await client.stub(Calls).meta()
        assert result == {"token": "abc", "n": 2}
        assert options.headers == {"h": 1}
        assert options.trailers == {"t": "two"}
        assert await client.call("calls.v1.meta", [], metadata={"x": "y"}) == {"x": "y"}


# ---------------------------------------------------------------------------- limits


async def test_oversize_result_is_resource_exhausted(serve: Serve) -> None:
    options = {"max_send_message_size": 4096}
    async with serve("memory://big", [CallsImpl()], options) as (_, client):
        assert len(await client.stub(Calls).big(1000)) == 1000
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).big(8192)
        assert info.value.status is vrpc.Status.RESOURCE_EXHAUSTED
        assert len(await client.stub(Calls).big(10)) == 10


async def test_oversize_request_is_refused_by_the_client(serve: Serve) -> None:
    impl = CallsImpl()
    async with serve("memory://big-req", [impl], max_send_message_size=4096) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).sink(b"z" * 8192)
        assert info.value.status is vrpc.Status.RESOURCE_EXHAUSTED
        assert impl.handled == 0
        assert await client.stub(Calls).sink(b"z" * 100) == 100


async def test_oversize_request_closes_the_connection(serve: Serve) -> None:
    impl = CallsImpl()
    options = {"max_receive_message_size": 4096}
    async with serve("memory://big-in", [impl], options) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).sink(b"z" * 8192)
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert impl.handled == 0
        # a fresh connection serves the next call
        assert await client.stub(Calls).sink(b"z") == 1


async def test_calls_beyond_the_announced_connection_limit_wait_in_order(serve: Serve) -> None:
    impl = CallsImpl()
    options = {"max_calls_per_connection": 2}
    async with serve("memory://inflight", [impl], options) as (_, client):
        tasks = [asyncio.create_task(client.stub(Calls).hold()) for _ in range(2)]
        await until(lambda: impl.started == 2, "two calls running")
        queued = asyncio.create_task(client.stub(Calls).remaining())
        await asyncio.sleep(0.1)
        assert not queued.done() and impl.started == 2  # held back by the client, not refused
        impl.release.set()
        assert await wait_for(asyncio.gather(*tasks)) == ["released ", "released "]
        assert await wait_for(queued) is None


async def test_calls_in_flight_limit(serve: Serve) -> None:
    impl = CallsImpl()
    async with serve("memory://inflight", [impl], {"max_concurrent_calls": 2}) as (_, client):
        tasks = [asyncio.create_task(client.stub(Calls).hold()) for _ in range(2)]
        await until(lambda: impl.started == 2, "two calls running")
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).remaining()
        assert info.value.status is vrpc.Status.RESOURCE_EXHAUSTED
        assert info.value.message == "the server has 2 calls in flight"
        assert info.value.details is None  # not marked unprocessed: the client does not resend
        impl.release.set()
        assert await wait_for(asyncio.gather(*tasks)) == ["released ", "released "]
        assert await client.stub(Calls).remaining() is None


async def test_max_connections(
    server_at: Callable[..., Any], new_client: Callable[..., vrpc.Client], uri: str
) -> None:
    async with (
        server_at(uri, [CallsImpl()], max_connections=1) as server,
        new_client(uri) as first,
    ):
        assert await first.stub(Calls).remaining() is None
        second = new_client(uri, connect_timeout=0.2)
        with pytest.raises((vrpc.HandshakeError, vrpc.RpcError)):
            await second.connect()
        await second.close()
        assert server.connection_count == 1
        assert await first.stub(Calls).remaining() is None


class _Silent(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = b""

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def test_handshake_timeout_closes_a_silent_connection(
    server_at: Callable[..., Any], uri: str
) -> None:
    async with server_at(uri, [CallsImpl()], handshake_timeout=0.05) as server:
        transport, proto = await create_connection(uri, _Silent)
        try:
            await wait_for(proto.lost)
        finally:
            transport.close()
        await until(lambda: server.connection_count == 0, "connection forgotten")


async def test_idle_timeout_closes_and_the_client_reconnects(serve: Serve, uri: str) -> None:
    async with serve(uri, [CallsImpl()], {"idle_timeout": 0.05}) as (server, client):
        first = client._proto
        assert first is not None
        await until(lambda: first.closed, "idle connection closed")
        await until(lambda: server.connection_count == 0, "server forgot it")
        assert await client.stub(Calls).remaining() is None
        assert client._proto is not first


# ---------------------------------------------------------------------------- interceptors


class Auth:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, ctx: vrpc.CallContext, call_next: Callable[[], Any]) -> Any:
        if ctx.metadata.get("token") != "s3cret":
            self.seen.append((ctx.method, "denied"))
            raise vrpc.RpcError(vrpc.Status.PERMISSION_DENIED, "bad token")
        try:
            result = await call_next()
        except vrpc.RpcError as exc:
            self.seen.append((ctx.method, exc.status.name))
            raise
        self.seen.append((ctx.method, "ok"))
        return result


class AddToken(vrpc.ClientInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept(
        self, method: str, metadata: dict[str, Any], call_next: Callable[[], Any]
    ) -> Any:
        self.methods.append(method)
        metadata["token"] = "s3cret"
        return await call_next()


async def test_server_interceptor_denies_and_observes(serve: Serve, uri: str) -> None:
    auth = Auth()
    impl = CallsImpl()
    async with serve(uri, [impl], {"interceptors": [auth]}) as (server, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).sink(b"abc")
        assert info.value.status is vrpc.Status.PERMISSION_DENIED
        assert impl.handled == 0
        with vrpc.call_options(metadata={"token": "s3cret"}):
            assert await client.stub(Calls).sink(b"abc") == 3
            with pytest.raises(vrpc.RpcError):
                await client.stub(Calls).flaky_once(1)
        assert auth.seen == [
            ("calls.v1.sink", "denied"),
            ("calls.v1.sink", "ok"),
            ("calls.v1.flaky_once", "UNAVAILABLE"),
        ]
        statuses = server.metrics.snapshot()["calls.v1.sink"]["statuses"]
        assert statuses == {"PERMISSION_DENIED": 1, "OK": 1}


async def test_client_interceptor_adds_metadata(serve: Serve, uri: str) -> None:
    token = AddToken()
    options = {"interceptors": [Auth()]}
    async with serve(uri, [CallsImpl()], options, interceptors=[token]) as (_, client):
        assert await client.stub(Calls).sink(b"ab") == 2
        assert (await client.stub(Calls).meta())["token"] == "s3cret"
        assert token.methods == ["calls.v1.sink", "calls.v1.meta"]


# ---------------------------------------------------------------------------- drain, reconnect


async def test_graceful_drain(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl], connect_timeout=0.2) as (server, client):
        in_flight = asyncio.create_task(client.stub(Calls).hold())
        await wait_for(impl.started_event.wait())
        closing = asyncio.create_task(server.close(grace=30))
        proto = client._proto
        assert proto is not None
        await until(lambda: proto.draining, "GOAWAY received")
        # new calls are refused (the listener is closed, the connection drains)
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).remaining()
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert not closing.done()
        impl.release.set()
        assert await wait_for(in_flight) == "released "
        await wait_for(closing)
        assert impl.cancelled == 0


async def test_drain_cancels_calls_past_the_grace_period(serve: Serve, uri: str) -> None:
    impl = CallsImpl()
    async with serve(uri, [impl]) as (server, client):
        in_flight = asyncio.create_task(client.stub(Calls).hold())
        await wait_for(impl.started_event.wait())
        await wait_for(server.close(grace=0.05))
        with pytest.raises(vrpc.RpcError) as info:
            await wait_for(in_flight)
        # The server went away under the call: UNAVAILABLE, which an idempotent call retries.
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert info.value.message == "server shut down before the call finished"
        assert impl.cancelled == 1


async def test_goaway_moves_new_calls_to_a_new_server(
    server_at: Callable[..., Any], new_client: Callable[..., vrpc.Client], uri: str
) -> None:
    old, new = CallsImpl("old"), CallsImpl("new")
    async with server_at(uri, [old]) as old_server, new_client(uri) as client:
        held = asyncio.create_task(client.stub(Calls).hold())
        await wait_for(old.started_event.wait())
        closing = asyncio.create_task(old_server.close(grace=30))
        draining = client._proto
        assert draining is not None
        await until(lambda: draining.draining, "GOAWAY received")
        async with server_at(uri, [new]):
            new.release.set()
            assert await client.stub(Calls).hold() == "released new"
            old.release.set()
            assert await wait_for(held) == "released old"
            await wait_for(closing)
            await until(lambda: draining.closed, "drained connection closed")


async def test_reconnect_after_server_restart(
    server_at: Callable[..., Any], new_client: Callable[..., vrpc.Client], uri: str
) -> None:
    client = new_client(uri)
    try:
        for round_ in range(3):
            impl = CallsImpl(str(round_))
            impl.release.set()
            async with server_at(uri, [impl]):
                assert await client.stub(Calls).hold() == f"released {round_}"
            # the client learns of the shutdown asynchronously
            await until(lambda: client._proto is None, "old connection dropped")
        # without waiting, an idempotent call rides over the stale connection by retrying
        for _ in range(3):
            async with server_at(uri, [CallsImpl()]):
                assert await client.stub(Calls).flaky(0) == 1
    finally:
        await client.close()


async def test_call_while_server_is_down_is_unavailable(
    new_client: Callable[..., vrpc.Client], uri: str
) -> None:
    client = new_client(uri, connect_timeout=0.1)
    with pytest.raises(vrpc.RpcError) as info:
        await client.call("calls.v1.remaining", [])
    assert info.value.status is vrpc.Status.UNAVAILABLE
    await client.close()


# ---------------------------------------------------------------------------- retries


async def test_idempotent_calls_are_retried(serve: Serve) -> None:
    impl = CallsImpl()
    async with serve("memory://retry", [impl], retries=2) as (_, client):
        assert await client.stub(Calls).flaky(2) == 3
        impl.attempts = 0
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).flaky(3)
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert impl.attempts == 3


async def test_other_calls_are_not_retried(serve: Serve) -> None:
    impl = CallsImpl()
    async with serve("memory://no-retry", [impl], retries=2) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Calls).flaky_once(1)
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert impl.attempts == 1


# ---------------------------------------------------------------------------- pool


@contextlib.asynccontextmanager
async def servers(
    server_at: Callable[..., Any], new_uri: Callable[[], str], impls: list[CallsImpl]
) -> AsyncIterator[list[tuple[str, vrpc.Server]]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for impl in impls:
            uri = new_uri()
            out.append((uri, await stack.enter_async_context(server_at(uri, [impl]))))
        yield out


def pool_for(uris: list[str], att: vrpc.InsecureTestAttester) -> vrpc.Pool:
    return vrpc.Pool(uris, policy=att.policy(), root=att.trust_root(), health_interval=60)


async def test_pool_routes_to_the_least_outstanding(
    server_at: Callable[..., Any],
    new_uri: Callable[[], str],
    attester: vrpc.InsecureTestAttester,
) -> None:
    impls = [CallsImpl(str(i)) for i in range(3)]
    async with (
        servers(server_at, new_uri, impls) as running,
        pool_for([u for u, _ in running], attester) as pool,
    ):
        stub = pool.stub(Calls)
        tasks = [asyncio.create_task(stub.hold()) for _ in range(3)]
        await until(lambda: sum(i.started for i in impls) == 3, "three calls running")
        assert [i.started for i in impls] == [1, 1, 1]
        for impl in impls:
            impl.release.set()
        assert sorted(await wait_for(asyncio.gather(*tasks))) == [
            "released 0",
            "released 1",
            "released 2",
        ]
        assert [i async for i in stub.count(3)] == [0, 1, 2]


async def test_pool_fails_over_when_an_endpoint_closes(
    server_at: Callable[..., Any],
    new_uri: Callable[[], str],
    attester: vrpc.InsecureTestAttester,
) -> None:
    impls = [CallsImpl(str(i)) for i in range(2)]
    for impl in impls:
        impl.release.set()
    async with (
        servers(server_at, new_uri, impls) as running,
        pool_for([u for u, _ in running], attester) as pool,
    ):
        stub = pool.stub(Calls)
        await asyncio.gather(*(stub.flaky(0) for _ in range(4)))
        await running[0][1].close(grace=0)
        for _ in range(6):
            assert await stub.flaky(0) > 0  # idempotent: moved to the live endpoint
        assert pool.endpoints[0].healthy is False
        before = impls[1].started
        assert await wait_for(stub.hold()) == "released 1"
        assert impls[1].started == before + 1


async def test_pool_with_no_reachable_endpoint(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    with pytest.raises(vrpc.RpcError) as info:
        async with pool_for([new_uri()], attester):
            pass
    assert info.value.status is vrpc.Status.UNAVAILABLE


# ---------------------------------------------------------------------------- metrics


async def test_metrics_from_reflection(serve: Serve, uri: str) -> None:
    async with serve(uri, [CallsImpl()]) as (_, client):
        for _ in range(3):
            await client.stub(Calls).sink(b"a")
        with pytest.raises(vrpc.RpcError):
            await client.stub(Calls).flaky_once(1)
        with pytest.raises(vrpc.RpcError):
            await client.call("calls.v1.nope", [])
        metrics = await client.call("vrpc.reflection.metrics", [])
        assert metrics["connections"] == 1
        assert metrics["calls_in_flight"] == 1  # this very call
        sink = metrics["methods"]["calls.v1.sink"]
        assert sink["calls"] == 3
        assert sink["statuses"] == {"OK": 3}
        assert sum(count for _, count in sink["latency_ms_buckets"]) == 3
        assert metrics["methods"]["calls.v1.flaky_once"]["statuses"] == {"UNAVAILABLE": 1}
        assert metrics["methods"]["calls.v1.nope"]["statuses"] == {"UNIMPLEMENTED": 1}


async def test_pool_moves_a_stream_no_server_started(
    server_at: Callable[..., Any],
    new_uri: Callable[[], str],
    attester: vrpc.InsecureTestAttester,
) -> None:
    impls = [CallsImpl(str(i)) for i in range(2)]
    async with (
        servers(server_at, new_uri, impls) as running,
        pool_for([u for u, _ in running], attester) as pool,
    ):
        stub = pool.stub(Calls)
        assert [i async for i in stub.count(3)] == [0, 1, 2]
        await running[0][1].close(grace=0)
        for _ in range(3):  # the first would go to the closed endpoint, the next to the live one
            assert [i async for i in stub.count(3)] == [0, 1, 2]
        assert pool.endpoints[0].healthy is False


async def test_pool_does_not_move_a_stream_whose_request_it_began_to_send(
    server_at: Callable[..., Any],
    new_uri: Callable[[], str],
    attester: vrpc.InsecureTestAttester,
) -> None:
    impls = [CallsImpl(str(i)) for i in range(2)]

    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    async with (
        servers(server_at, new_uri, impls) as running,
        pool_for([u for u, _ in running], attester) as pool,
    ):
        await running[0][1].close(grace=0)
        # The request iterator cannot be replayed: the caller hears of the failure instead.
        with pytest.raises(vrpc.RpcError) as info:
            await pool.stub(Calls).total(numbers())
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert pool.endpoints[0].healthy is False
        assert await pool.stub(Calls).total(numbers()) == 3  # the next one goes to the live one
