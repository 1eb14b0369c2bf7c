"""Under load nothing fails that could have waited: calls beyond the server's per-connection
limit queue in the client (in order, subject to deadline and cancellation), a pool spreads calls
over endpoints and connections and fails over, and a server at its connection limit refuses at
once. Small, bounded versions of the soak's load scenarios (tests/soak.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

import vrpc
from tests.hostile_helpers import RawSession, attester, client, serving, sock_uri
from vrpc.pool import MAX_CONNECTIONS_PER_ENDPOINT
from vrpc.proto.events import ErrorReceived, ResponseReceived


class Work(vrpc.Service, name="load.v1"):
    @vrpc.rpc
    async def work(self, i: int, seconds: float) -> int: ...

    @vrpc.rpc(idempotent=True)
    async def lookup(self, i: int, seconds: float) -> int: ...

    @vrpc.rpc
    async def hold(self, i: int) -> int: ...

    @vrpc.rpc
    def items(self, i: int, n: int) -> AsyncIterator[int]: ...


class WorkImpl(Work):
    """Records which calls started and finished, and the most it ever ran at once."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.finished: set[int] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()

    def _enter(self, i: int) -> None:
        self.started.append(i)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self, i: int, *, answered: bool = True) -> None:
        self.in_flight -= 1
        if answered:
            self.finished.add(i)

    async def work(self, i: int, seconds: float) -> int:
        self._enter(i)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self._leave(i, answered=False)
            raise
        self._leave(i)
        return i * 2

    async def lookup(self, i: int, seconds: float) -> int:
        return await self.work(i, seconds)

    async def hold(self, i: int) -> int:
        self._enter(i)
        try:
            await self.release.wait()
        finally:
            self._leave(i)
        return i

    async def items(self, i: int, n: int) -> AsyncIterator[int]:
        self._enter(i)
        try:
            await self.release.wait()
            for k in range(n):
                yield k
        finally:
            self._leave(i)


async def until(predicate: Any, what: str, timeout: float = 5.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def pool(uris: list[str], **options: Any) -> vrpc.Pool:
    att = attester()
    return vrpc.Pool(uris, policy=att.policy(), root=att.trust_root(), **options)


# ---------------------------------------------------------------------------- one connection


async def test_3000_concurrent_calls_queue_under_the_limit_in_order(tmp_path: Path) -> None:
    uri, limit, n = sock_uri(tmp_path), 64, 3000
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=limit), client(uri) as c:
        stub = c.stub(Work)
        results = await asyncio.wait_for(
            asyncio.gather(*(stub.work(i, 0.005) for i in range(n)), return_exceptions=True), 60
        )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert results == [i * 2 for i in range(n)]
    assert impl.max_in_flight == limit  # the connection was kept full, never over
    assert sorted(impl.started) == list(range(n))
    # Started in the order issued: a call is overtaken by at most a connection's worth of others.
    worst = max(abs(pos - i) for pos, i in enumerate(impl.started))
    assert worst <= limit, worst


async def test_a_queued_call_whose_deadline_passes_never_reaches_the_server(
    tmp_path: Path,
) -> None:
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=2), client(uri) as c:
        stub = c.stub(Work)
        held = [asyncio.create_task(stub.hold(i)) for i in range(2)]
        await until(lambda: len(impl.started) == 2, "two calls running")
        started = time.monotonic()
        with pytest.raises(vrpc.RpcError) as info, vrpc.call_options(timeout=0.1):
            await stub.work(99, 0)
        assert info.value.status is vrpc.Status.DEADLINE_EXCEEDED
        assert info.value.message == "deadline exceeded while queued"
        assert time.monotonic() - started < 2.0
        impl.release.set()
        assert await asyncio.wait_for(asyncio.gather(*held), 5) == [0, 1]
        assert await stub.work(7, 0) == 14
    assert impl.started == [0, 1, 7]  # 99 never reached the server


async def test_a_cancelled_queued_call_never_reaches_the_wire(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=2), client(uri) as c:
        stub = c.stub(Work)
        held = [asyncio.create_task(stub.hold(i)) for i in range(2)]
        await until(lambda: len(impl.started) == 2, "two calls running")
        queued = [asyncio.create_task(stub.work(i, 0)) for i in (10, 11, 12)]
        await asyncio.sleep(0.05)
        queued[1].cancel()  # the middle one: its turn must pass to the next in line
        impl.release.set()
        assert await asyncio.wait_for(asyncio.gather(*held), 5) == [0, 1]
        assert await asyncio.wait_for(asyncio.gather(queued[0], queued[2]), 5) == [20, 24]
        with pytest.raises(asyncio.CancelledError):
            await queued[1]
        assert c.calls_in_flight == 0
    assert sorted(impl.started) == [0, 1, 10, 12]


async def test_streams_count_against_the_same_limit(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=2), client(uri) as c:
        stub = c.stub(Work)

        async def drain(i: int) -> list[int]:
            return [k async for k in stub.items(i, 3)]

        streams = [asyncio.create_task(drain(i)) for i in range(2)]
        await until(lambda: len(impl.started) == 2, "two streams open")
        unary = asyncio.create_task(stub.work(5, 0))
        third = asyncio.create_task(drain(6))
        await asyncio.sleep(0.1)
        assert impl.started == [0, 1]  # both wait in the client behind the two open streams
        assert impl.max_in_flight == 2
        impl.release.set()
        assert await asyncio.wait_for(asyncio.gather(*streams, third), 5) == [[0, 1, 2]] * 3
        assert await asyncio.wait_for(unary, 5) == 10
    assert impl.max_in_flight == 2
    assert sorted(impl.started) == [0, 1, 5, 6]


async def test_a_raw_peer_ignoring_the_announced_limit_is_refused_unprocessed(
    tmp_path: Path,
) -> None:
    uri, limit = sock_uri(tmp_path), 4
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=limit):
        raw = await RawSession.open(uri)
        try:
            for i in range(limit + 6):
                raw.call("load.v1.work", [i, 0.3])
            outcomes: list[Any] = []
            for _ in range(200):
                outcomes += await raw.events()
                if len(outcomes) >= limit + 6:
                    break
            refused = [ev for ev in outcomes if isinstance(ev, ErrorReceived)]
            assert len([ev for ev in outcomes if isinstance(ev, ResponseReceived)]) == limit
            assert len(refused) == 6
            for ev in refused:
                assert ev.status is vrpc.Status.RESOURCE_EXHAUSTED
                assert ev.details == {"unprocessed": True}
            assert impl.max_in_flight == limit
            assert sorted(impl.started) == list(range(limit))
        finally:
            raw.close()


# ---------------------------------------------------------------------------- pool


async def test_pool_of_two_endpoints_serves_2000_concurrent_idempotent_calls(
    tmp_path: Path,
) -> None:
    impls = [WorkImpl(), WorkImpl()]
    uris = [sock_uri(tmp_path, f"p{i}") for i in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for uri, impl in zip(uris, impls, strict=True):
            await stack.enter_async_context(serving(uri, [impl], max_calls_per_connection=64))
        async with pool(uris, health_interval=60) as p:
            stub = p.stub(Work)
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(stub.lookup(i, 0.005) for i in range(2000)), return_exceptions=True
                ),
                60,
            )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert results == [i * 2 for i in range(2000)]
    assert all(impl.max_in_flight == 64 for impl in impls)  # both endpoints kept full
    assert sorted(impls[0].started + impls[1].started) == list(range(2000))


async def test_pool_opens_connections_per_endpoint_and_uses_them(tmp_path: Path) -> None:
    uri, limit = sock_uri(tmp_path), 8
    impl = WorkImpl()
    async with (
        serving(uri, [impl], max_calls_per_connection=limit) as server,
        pool([uri], health_interval=60, connections_per_endpoint=4) as p,
    ):
        assert server.connection_count == 4
        stub = p.stub(Work)
        calls = [asyncio.create_task(stub.work(i, 0.05)) for i in range(200)]
        await asyncio.sleep(0.01)  # every call has found its connection; none has finished
        # 32 running, the rest queued evenly behind the four full connections.
        clients = p.endpoints[0].clients
        assert [c.calls_in_flight for c in clients] == [limit] * 4
        assert [c.calls_queued for c in clients] == [(200 - 4 * limit) // 4] * 4
        results = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert results == [i * 2 for i in range(200)]
        assert server.connection_count == 4
    assert impl.max_in_flight == 4 * limit  # all four connections full at once
    with pytest.raises(ValueError, match="connections_per_endpoint"):
        pool([uri], connections_per_endpoint=MAX_CONNECTIONS_PER_ENDPOINT + 1)
    with pytest.raises(ValueError, match="connections_per_endpoint"):
        pool([uri], connections_per_endpoint=0)


async def test_twice_max_connections_clients_the_excess_refused_at_once(tmp_path: Path) -> None:
    uri, limit = sock_uri(tmp_path), 10
    impl = WorkImpl()
    async with serving(uri, [impl], max_connections=limit) as server:
        clients = [client(uri, connect_timeout=5.0) for _ in range(2 * limit)]

        async def connect(c: vrpc.Client) -> tuple[float, BaseException | None]:
            started = time.monotonic()
            try:
                await c.connect()
            except vrpc.RpcError as exc:
                return time.monotonic() - started, exc
            return time.monotonic() - started, None

        try:
            outcomes = await asyncio.wait_for(asyncio.gather(*(connect(c) for c in clients)), 30)
            refused = [(t, exc) for t, exc in outcomes if exc is not None]
            assert len(refused) == limit
            for took, exc in refused:
                assert isinstance(exc, vrpc.RpcError)
                assert exc.status is vrpc.Status.UNAVAILABLE
                assert exc.message == "server at connection limit"
                assert took < 2.0  # answered, not left to the 5 s connect timeout
            assert server.connection_count == limit
            took_ms = sorted(t * 1000 for t, _ in refused)
            print(f"\nrefused in {took_ms[0]:.1f}-{took_ms[-1]:.1f} ms during {limit} handshakes")
            served = [c for c, (_, exc) in zip(clients, outcomes, strict=True) if exc is None]
            answers = await asyncio.gather(*(c.stub(Work).work(i, 0) for i, c in enumerate(served)))
            assert answers == [i * 2 for i in range(limit)]
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def start_server(uri: str, impl: WorkImpl, **options: Any) -> vrpc.Server:
    server = vrpc.Server([impl], attester=attester(), **options)
    await server.start(uri)
    return server


async def test_pool_over_three_servers_one_restarted_loses_no_call(tmp_path: Path) -> None:
    """Every call is accounted for: idempotent ones all succeed; a non-idempotent one fails only
    with UNAVAILABLE, and only if it had started on the server that was stopped."""
    uris = [sock_uri(tmp_path, f"r{i}") for i in range(3)]
    impls = [WorkImpl() for _ in range(3)]
    restarted = WorkImpl()
    n = 900
    servers = [
        await start_server(u, impl, max_calls_per_connection=16)
        for u, impl in zip(uris, impls, strict=True)
    ]
    try:
        async with pool(uris, health_interval=0.05) as p:
            stub = p.stub(Work)

            async def one(i: int) -> int:
                await asyncio.sleep(i * 0.0015)  # spread the calls over ~1.4 s
                if i % 2:
                    return await stub.lookup(i, 0.03)
                return await stub.work(i, 0.03)

            load = asyncio.ensure_future(
                asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
            )
            await until(lambda: len(impls[1].started) > 20, "load on the server to stop")
            # Stop it with calls in flight; a fresh server comes back on the same address.
            await servers[1].close(grace=0)
            await asyncio.sleep(0.2)
            servers[1] = await start_server(uris[1], restarted, max_calls_per_connection=16)
            results = await asyncio.wait_for(load, 60)
    finally:
        for server in servers:
            await server.close(grace=0)
    successes = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    failures = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    assert len(successes) + len(failures) == n
    for i in successes:
        assert results[i] == i * 2
    cut_off = set(impls[1].started) - impls[1].finished
    print(f"\n{len(successes)} succeeded, {len(failures)} failed, {len(cut_off)} cut off")
    for i, exc in failures.items():
        assert i % 2 == 0, f"idempotent call {i} failed: {exc!r}"
        assert isinstance(exc, vrpc.RpcError) and exc.status is vrpc.Status.UNAVAILABLE, exc
        assert i in cut_off, f"call {i} failed but was not in flight on the stopped server: {exc}"
    assert restarted.started, "the restarted server got no calls back"


async def test_pool_moves_any_call_off_a_server_at_its_connection_limit(tmp_path: Path) -> None:
    """The refusal says the call never reached the server: even a non-idempotent call moves."""
    uris = [sock_uri(tmp_path, f"c{i}") for i in range(2)]
    impls = [WorkImpl(), WorkImpl()]
    async with (
        serving(uris[0], [impls[0]], max_connections=1) as full,
        serving(uris[1], [impls[1]]),
        pool(uris, health_interval=60, connect_timeout=5.0) as p,
    ):
        # The pool's connection to the first server goes away and another client takes the
        # server's only connection slot.
        first = p.endpoints[0].clients[0]
        assert first._proto is not None
        first._proto.close_gracefully("test")
        await until(lambda: full.connection_count == 0, "the pool's connection to close")
        async with client(uris[0]):
            assert full.connection_count == 1
            started = time.monotonic()
            assert await p.stub(Work).work(3, 0) == 6  # not idempotent, still moved
            took = time.monotonic() - started
            assert impls[1].started == [3] and impls[0].started == []
            assert p.endpoints[0].healthy is False
            assert took < 2.0  # refused at once, not after the 5 s connect timeout


async def test_a_saturated_endpoint_stays_healthy_while_calls_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A health probe would wait behind the queued calls and time out: a busy endpoint must not
    be taken for a dead one (new calls would find no healthy endpoint)."""
    monkeypatch.setattr("vrpc.pool.PROBE_TIMEOUT", 0.05)
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with (
        serving(uri, [impl], max_calls_per_connection=2),
        pool([uri], health_interval=0.02) as p,
    ):
        stub = p.stub(Work)
        held = [asyncio.create_task(stub.hold(i)) for i in range(2)]
        await until(lambda: len(impl.started) == 2, "two calls running")
        queued = asyncio.create_task(stub.work(5, 0))
        await asyncio.sleep(0.3)  # many probe intervals, each longer than the probe timeout
        assert p.endpoints[0].healthy
        impl.release.set()
        assert await asyncio.wait_for(asyncio.gather(*held, queued), 5) == [0, 1, 10]
        assert await stub.work(6, 0) == 12


async def test_a_woken_call_cancelled_before_it_runs_passes_its_turn_on(
    tmp_path: Path,
) -> None:
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=1), client(uri) as c:
        stub = c.stub(Work)
        held = asyncio.create_task(stub.hold(0))
        await until(lambda: len(impl.started) == 1, "one call running")
        first = asyncio.create_task(stub.work(1, 0))
        second = asyncio.create_task(stub.work(2, 0))
        await asyncio.sleep(0.05)
        proto = c._proto
        assert proto is not None and c.calls_queued == 2
        wake = proto._wake

        def wake_then_cancel() -> None:
            wake()  # hands the free slot to ``first``...
            if not first.done() and not first.cancelling():
                first.cancel()  # ...which is cancelled before it runs

        proto._wake = wake_then_cancel  # type: ignore[method-assign]
        impl.release.set()
        assert await asyncio.wait_for(held, 5) == 0
        assert await asyncio.wait_for(second, 5) == 4  # the slot reached the next in line
        with pytest.raises(asyncio.CancelledError):
            await first
        assert c.calls_queued == 0 and c.calls_in_flight == 0
    assert impl.started == [0, 2]


async def test_many_queued_calls_expire_or_are_cancelled_and_the_queue_empties(
    tmp_path: Path,
) -> None:
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=1), client(uri) as c:
        stub = c.stub(Work)
        held = asyncio.create_task(stub.hold(0))
        await until(lambda: len(impl.started) == 1, "one call running")
        with vrpc.call_options(timeout=0.05):
            expiring = [asyncio.create_task(stub.work(i, 0)) for i in range(1, 201)]
        cancelled = [asyncio.create_task(stub.work(i, 0)) for i in range(201, 401)]
        # The calls without a deadline all wait in the client (some with one may have expired
        # already on a busy machine).
        await until(lambda: c.calls_queued >= 200, "calls queued in the client")
        for task in cancelled:
            task.cancel()
        outcomes = await asyncio.gather(*expiring, *cancelled, return_exceptions=True)
        assert all(
            isinstance(o, vrpc.RpcError) and o.status is vrpc.Status.DEADLINE_EXCEEDED
            for o in outcomes[:200]
        )
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes[200:])
        assert c.calls_queued == 0 and c.calls_in_flight == 1
        impl.release.set()
        assert await asyncio.wait_for(held, 5) == 0
        assert not c.saturated  # nothing waits: a new call starts at once
        assert await stub.work(500, 0) == 1000
    assert impl.started == [0, 500]


async def test_a_pool_with_no_healthy_endpoint_refuses_before_sending(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with serving(uri, [impl]), pool([uri], health_interval=60) as p:
        p.endpoints[0].healthy = False  # as after a failure, until the next health check
        with pytest.raises(vrpc.RpcError) as info:
            await p.stub(Work).work(1, 0)
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert info.value.message == "no healthy endpoint in the pool"
        assert info.value.details == {"unprocessed": True}  # safe to send again later
    assert impl.started == []


async def test_a_refusal_at_the_connection_limit_logs_one_line(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri, [WorkImpl()], max_connections=1), client(uri) as held:
        assert held.calls_in_flight == 0
        extra = client(uri)
        with structlog.testing.capture_logs() as logs, pytest.raises(vrpc.RpcError):
            await extra.connect()
        await extra.close()
        await asyncio.sleep(0.05)  # the server side of the refused connection ends
    events = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
    assert events == ["connection refused"]


async def test_calls_waiting_for_a_connection_share_one_attempt(tmp_path: Path) -> None:
    """50 calls to a server that is not there learn it together after one connect attempt
    (about ``connect_timeout``), not one attempt after another (50 x 0.3 s)."""
    uri = sock_uri(tmp_path, "nobody")
    c = client(uri, connect_timeout=0.3)
    try:
        started = time.monotonic()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(c.stub(Work).work(i, 0) for i in range(50)), return_exceptions=True),
            10,
        )
        took = time.monotonic() - started
    finally:
        await c.close()
    assert all(
        isinstance(o, vrpc.RpcError)
        and o.status is vrpc.Status.UNAVAILABLE
        and o.details == {"unprocessed": True}
        for o in outcomes
    ), outcomes[:3]
    assert len({str(o) for o in outcomes}) == 1  # the same attempt's outcome for all
    assert took < 5.0, took


async def test_streams_refused_before_the_announcement_are_sent_again(tmp_path: Path) -> None:
    """Streams opened the moment the session is up go out before the server's SETTINGS arrive
    (the client assumes 100); those over the server's limit of 4 are refused as unprocessed and
    sent again, so every stream completes."""
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    impl.release.set()
    async with serving(uri, [impl], max_calls_per_connection=4), client(uri) as c:
        assert c._proto is not None and c._proto.conn.peer_max_calls is None  # not yet known
        stub = c.stub(Work)

        async def drain(i: int) -> list[int]:
            return [k async for k in stub.items(i, 3)]

        got = await asyncio.wait_for(asyncio.gather(*(drain(i) for i in range(10))), 10)
    assert got == [[0, 1, 2]] * 10
    assert sorted(impl.started) == list(range(10))  # each ran once: the refused never started


async def test_calls_queued_on_a_draining_connection_move_to_the_next_at_once(
    tmp_path: Path,
) -> None:
    uri = sock_uri(tmp_path)
    old, new = WorkImpl(), WorkImpl()
    c = client(uri)
    try:
        async with serving(uri, [old], max_calls_per_connection=2) as old_server:
            stub = c.stub(Work)
            held = [asyncio.create_task(stub.hold(i)) for i in range(2)]
            await until(lambda: len(old.started) == 2, "two calls running")
            queued = asyncio.create_task(stub.work(7, 0))
            await asyncio.sleep(0.05)
            assert c.calls_queued == 1
            draining = c._proto
            assert draining is not None
            closing = asyncio.create_task(old_server.close(grace=30))  # GOAWAY, calls go on
            await until(lambda: draining.draining, "GOAWAY received")
            async with serving(uri, [new], max_calls_per_connection=2):
                # Answered by the new server while the old one still runs its two calls.
                assert await asyncio.wait_for(queued, 5) == 14
                assert new.started == [7] and not any(t.done() for t in held)
                old.release.set()
                assert await asyncio.wait_for(asyncio.gather(*held), 5) == [0, 1]
                await asyncio.wait_for(closing, 5)
    finally:
        await c.close()


async def test_a_server_refusing_what_it_announced_cannot_hold_a_call_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server announcing 1,000 calls but serving 1 refuses the second as unprocessed every
    time it is sent: after MAX_RESENDS further sends the caller gets the refusal."""
    from vrpc.proto import connection

    announce = connection.Connection.send_settings

    def overstated(self: connection.Connection) -> None:
        self.max_concurrent_calls, real = 1000, self.max_concurrent_calls
        announce(self)
        self.max_concurrent_calls = real

    monkeypatch.setattr(connection.Connection, "send_settings", overstated)
    monkeypatch.setattr("vrpc.client.MAX_RESENDS", 3)
    uri = sock_uri(tmp_path)
    impl = WorkImpl()
    async with serving(uri, [impl], max_calls_per_connection=1), client(uri) as c:
        await until(lambda: c._proto is not None and c._proto.conn.peer_max_calls, "SETTINGS")
        held = asyncio.create_task(c.stub(Work).hold(0))
        await until(lambda: len(impl.started) == 1, "one call running")
        with pytest.raises(vrpc.RpcError) as info:
            await asyncio.wait_for(c.stub(Work).work(1, 0), 5)
        assert info.value.status is vrpc.Status.RESOURCE_EXHAUSTED
        assert info.value.details == {"unprocessed": True}
        assert not held.done()
        impl.release.set()
        assert await asyncio.wait_for(held, 5) == 0
    assert impl.started == [0]
