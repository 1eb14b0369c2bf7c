"""The composed protocol end to end over unix sockets: keepalive on an idle connection and during
a long call, an oversize PONG, the CLOSE exchange, the connection limit, session age."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

import vrpc
from vrpc.proto.connection import PING


class Slow(vrpc.Service, name="slow.v1"):
    @vrpc.rpc
    async def nap(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "rested"


def unix(tmp_path: Path, name: str = "s") -> str:
    return f"unix://{tmp_path / (name + '.sock')}"


async def test_idle_connection_survives_keepalive_on_the_same_connection(
    serve: Any, tmp_path: Path
) -> None:
    options = {"keepalive_interval": 0.3, "keepalive_timeout": 0.5}
    async with serve(unix(tmp_path), [Slow()], options, keepalive_interval=0.3) as (server, client):
        stub = client.stub(Slow)
        assert await stub.nap(0) == "rested"
        first = client._proto
        await asyncio.sleep(2.0)  # several keepalive intervals on both sides
        assert await stub.nap(0) == "rested"
        assert client._proto is first and not first.closed  # no reconnect, no re-attestation
        assert server.connection_count == 1


async def test_a_call_longer_than_the_keepalive_interval_succeeds(
    serve: Any, tmp_path: Path
) -> None:
    options = {"keepalive_interval": 0.2, "keepalive_timeout": 0.5}
    async with serve(unix(tmp_path), [Slow()], options, keepalive_interval=0.2) as (_, client):
        first_connection = None
        stub = client.stub(Slow)
        await stub.nap(0)
        first_connection = client._proto
        assert await stub.nap(1.5) == "rested"  # over seven intervals
        assert client._proto is first_connection


async def test_an_oversize_pong_closes_that_connection_cleanly_and_the_server_serves_on(
    serve: Any, new_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = unix(tmp_path)
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with serve(uri, [Slow()], {"max_send_message_size": 1024}) as (_, client):
        proto = client._proto
        proto.conn._emit((PING, b"x" * 4096))  # its PONG would exceed the server's send limit
        proto.flush_now()
        for _ in range(200):
            if proto.closed:
                break
            await asyncio.sleep(0.01)
        assert proto.closed and proto.closed_by is not None
        assert proto.closed_by.clean  # the server's CLOSE, not a reset
        assert "Fatal error" not in caplog.text
        async with new_client(uri) as other:
            assert await other.stub(Slow).nap(0) == "rested"
        assert await client.stub(Slow).nap(0) == "rested"  # reconnects


async def test_client_close_is_answered_by_the_servers_close(serve: Any, tmp_path: Path) -> None:
    async with serve(unix(tmp_path), [Slow()]) as (_, client):
        await client.stub(Slow).nap(0)
        proto = client._proto
        await client.close()
        assert proto.closed_by is not None and proto.closed_by.clean
        assert proto.closed_by.reason == "the server closed the connection"
        assert proto.gone.done()  # what close awaited: no polling


async def test_a_lost_connection_resolves_what_a_close_awaits(serve: Any, tmp_path: Path) -> None:
    async with serve(unix(tmp_path), [Slow()]) as (_, client):
        await client.stub(Slow).nap(0)
        proto = client._proto
        assert not proto.gone.done()
        proto.abort()  # no CLOSE exchange at all
        await asyncio.wait_for(proto.gone, 2.0)
        assert proto.closed


async def test_server_shutdown_closes_with_close_records(
    server_at: Any, new_client: Any, tmp_path: Path
) -> None:
    uri = unix(tmp_path)
    async with server_at(uri, [Slow()]) as server:
        client = new_client(uri)
        await client.connect()
        proto = client._proto
        await server.close(grace=1)
        for _ in range(100):
            if proto.closed:
                break
            await asyncio.sleep(0.01)
        assert proto.closed_by is not None and proto.closed_by.clean
        await client.close()


async def test_over_the_connection_limit_the_refusal_is_fast_and_clear(
    server_at: Any, new_client: Any, tmp_path: Path
) -> None:
    uri = unix(tmp_path)
    async with server_at(uri, [Slow()], max_connections=2) as server:
        held = [new_client(uri) for _ in range(2)]
        for c in held:
            await c.connect()
        extra = new_client(uri, connect_timeout=5.0)
        started = time.monotonic()
        with pytest.raises(vrpc.RpcError) as info:
            await extra.connect()
        assert time.monotonic() - started < 1.0  # refused at once, not after the timeout
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert "connection limit" in info.value.message
        for c in held:  # the honest connections are unaffected
            assert await c.stub(Slow).nap(0) == "rested"
        assert server.connection_count == 2
        for c in [*held, extra]:
            await c.close()


async def test_the_server_enforces_session_age_even_on_a_busy_connection(
    serve: Any, tmp_path: Path
) -> None:
    options = {"max_session_age": 0.5, "session_grace": 0.3}
    async with serve(unix(tmp_path), [Slow()], options) as (_, client):
        stub = client.stub(Slow)
        await stub.nap(0)
        first = client._proto
        with pytest.raises(vrpc.RpcError) as info:
            await stub.nap(3)  # outlives the age and the grace
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert first.closed
        assert await stub.nap(0) == "rested"  # a fresh, attested session
        assert client._proto is not first


class _ThreadNoting:
    """Wraps the test attester without its ``attests_inline`` flag, as a custom attester would
    be, and notes which thread it was called in."""

    insecure = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.threads: list[str] = []

    def attest(self, **fields: Any) -> bytes:
        import threading

        self.threads.append(threading.current_thread().name)
        document: bytes = self.inner.attest(**fields)
        return document


async def test_an_attester_without_the_inline_flag_runs_off_the_event_loop(
    attester: Any, new_client: Any, tmp_path: Path
) -> None:
    import threading

    noting = _ThreadNoting(attester)
    uri = unix(tmp_path)
    server = vrpc.Server([Slow()], attester=noting)
    await server.start(uri)
    try:
        async with new_client(uri) as client:
            assert await client.stub(Slow).nap(0) == "rested"
    finally:
        await server.close(grace=0)
    assert noting.threads and threading.main_thread().name not in noting.threads
