"""Hostile peers after the handshake: sessions driven by hand to send what honest clients never do.

Each bad connection must be closed (or refused a call) on its own while an honest client in
parallel keeps getting answers; the printed latency shows what the honest client saw.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from hostile_helpers import (
    MARKER,
    HonestProbe,
    RawSession,
    Slow,
    SlowImpl,
    rss_bytes,
    serving,
    sock_uri,
    wait_until,
)
from structlog.testing import capture_logs

from services.echo import EchoImpl
from vrpc.proto.events import ErrorReceived, ResponseReceived
from vrpc.proto.record import REC_DATA
from vrpc.status import Status

_ = Slow


@pytest.fixture(autouse=True)
async def _close_raw_sessions() -> AsyncIterator[None]:
    yield
    await RawSession.close_all()


def _reasons(logs: list[dict[str, object]]) -> str:
    return " | ".join(f"{e.get('reason')}: {e.get('error')}" for e in logs)


async def test_echo_works_over_a_hand_driven_session(tmp_path: Path) -> None:
    # The baseline every other test here departs from: the hand-driven session is well-formed.
    uri = sock_uri(tmp_path)
    async with serving(uri, allow_plaintext=True):
        for plaintext in (False, True):
            raw = await RawSession.open(uri, plaintext=plaintext)
            raw.call("echo.v1.echo", [MARKER])
            (ev,) = await raw.events()
            assert isinstance(ev, ResponseReceived) and ev.result == MARKER
            raw.close()


async def test_oversize_frame_prefix_after_handshake(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri, allow_plaintext=True) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri, plaintext=True)
        with capture_logs() as logs:
            raw.send_plain(struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 1000)
            assert await raw.closed_by_server()
        assert "exceeds the maximum" in _reasons(logs)
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("oversize frame prefix")


async def test_oversize_record_header_after_handshake(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        with capture_logs() as logs:
            raw.send_wire(struct.pack(">BI", REC_DATA, 0xFFFFFFFF) + b"\x00" * 1000)
            assert await raw.closed_by_server()
        assert "exceeds the maximum" in _reasons(logs)
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("oversize record header")


async def test_garbage_messages_after_handshake(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    garbage = [
        b"\xc1",  # never-used msgpack byte
        msgspec.msgpack.encode({"not": "an array"}),
        msgspec.msgpack.encode([]),
        msgspec.msgpack.encode([99, 1, 2]),  # unknown message type
        msgspec.msgpack.encode([0, 1, "echo.v1.echo"]),  # REQUEST with missing fields
        msgspec.msgpack.encode([0, -5, "echo.v1.echo", [], 0, None, None]),  # bad call id
        msgspec.msgpack.encode([0, 1, 7, [], 0, None, None]),  # method is not a string
        msgspec.msgpack.encode([1, 1, None, None]),  # a RESPONSE sent to the server
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 G elements, truncated
    ]
    async with serving(uri, allow_plaintext=True) as server, HonestProbe(uri) as honest:
        for body in garbage:
            raw = await RawSession.open(uri, plaintext=True)
            with capture_logs() as logs:
                raw.send_plain(struct.pack(">I", len(body)) + body)
                assert await raw.closed_by_server(), body
            assert "protocol violation" in _reasons(logs), (body, logs)
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("garbage after handshake")


async def test_deeply_nested_arguments_close_only_that_connection(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    deep = b"\x91" * 100_000 + b"\xc0"  # [[[[...None...]]]], 100000 levels, ~100 KB
    name = msgspec.msgpack.encode("echo.v1.echo")
    body = b"\x97\x00\x01" + name + deep + b"\x00\xc0\xc0"
    async with serving(uri, allow_plaintext=True) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri, plaintext=True)
        with capture_logs() as logs:
            raw.send_plain(struct.pack(">I", len(body)) + body)
            assert await raw.closed_by_server()
        assert "protocol violation" in _reasons(logs), logs
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("100000-level nesting")


async def test_huge_flat_argument_is_rejected_as_a_call_error(tmp_path: Path) -> None:
    # Four million one-byte elements: inside the frame limit, so it decodes, and the argument
    # check refuses it (echo takes bytes) without touching the connection.
    uri = sock_uri(tmp_path)
    n = 4_000_000
    name = msgspec.msgpack.encode("echo.v1.echo")
    body = b"\x97\x00\x01" + name + b"\x91" + b"\xdd" + n.to_bytes(4, "big") + b"\x00" * n
    body += b"\x00\xc0\xc0"
    async with serving(uri, allow_plaintext=True), HonestProbe(uri) as honest:
        raw = await RawSession.open(uri, plaintext=True)
        raw.send_request_body(body)
        (ev,) = await raw.events(timeout=20)
        assert isinstance(ev, ErrorReceived) and ev.status is Status.INVALID_ARGUMENT
        raw.call("echo.v1.echo", [b"still here"])
        (ev,) = await raw.events()
        assert isinstance(ev, ResponseReceived) and ev.result == b"still here"
        raw.close()
        await honest.check("4 M-element argument")


async def test_replayed_record_breaks_the_session(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        raw.conn.start_call("echo.v1.echo", [b"once"], now=0.0)
        out = raw.conn.data_to_send()
        assert out is not None
        records = raw.session.seal(bytes(out))
        raw.send_wire(b"".join(records))
        (ev,) = await raw.events()
        assert isinstance(ev, ResponseReceived) and ev.result == b"once"
        with capture_logs() as logs:
            raw.send_wire(b"".join(records))  # the same record again
            assert await raw.closed_by_server()
        assert "authentication failed" in _reasons(logs)
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("replayed record")


async def test_reordered_records_break_the_session(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        first = raw.session.seal(raw_request(raw, b"first"))
        second = raw.session.seal(raw_request(raw, b"second"))
        with capture_logs() as logs:
            raw.send_wire(b"".join(second) + b"".join(first))
            assert await raw.closed_by_server()
        assert "authentication failed" in _reasons(logs)
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("reordered records")


def raw_request(raw: RawSession, payload: bytes) -> bytes:
    raw.conn.start_call("echo.v1.echo", [payload], now=0.0)
    out = raw.conn.data_to_send()
    assert out is not None
    return bytes(out)


async def test_call_flood_beyond_the_in_flight_limit(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    limit = 8
    slow = SlowImpl()
    served = serving(uri, [slow, EchoImpl()], max_calls_per_connection=limit)
    async with served as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        for _ in range(limit + 40):
            raw.call("slow.v1.sleep", [0.3])
        statuses: dict[str, int] = {}
        for _ in range(200):
            for ev in await raw.events():
                key = "OK" if isinstance(ev, ResponseReceived) else ev.status.name
                statuses[key] = statuses.get(key, 0) + 1
            if sum(statuses.values()) == limit + 40:
                break
        assert statuses == {"OK": limit, "RESOURCE_EXHAUSTED": 40}
        # The connection stays up: the next call goes through.
        raw.call("echo.v1.echo", [b"after the flood"])
        (ev,) = await raw.events()
        assert isinstance(ev, ResponseReceived) and ev.result == b"after the flood"
        assert server.connection_count == 2
        raw.close()
        await honest.check("call flood")


async def test_peer_that_never_reads_cannot_grow_server_memory(tmp_path: Path) -> None:
    """1 MiB echo requests sent by a peer that never reads a response: the server must stop
    reading that peer (its write buffer is full) instead of buffering every response."""
    uri = sock_uri(tmp_path)
    payload = b"\xa5" * (1024 * 1024)
    bound = 64 * 1024 * 1024
    attempts = 300  # 300 MiB of responses if the server kept reading
    async with serving(uri) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        transport = raw.writer.transport
        rss_before = rss_bytes()
        sent = 0
        stalled = False
        for _ in range(attempts):
            # Keep at most ~4 MiB queued on our side: we measure the server, not ourselves.
            for _ in range(50):
                if transport.get_write_buffer_size() < 4 * 1024 * 1024:
                    break
                await asyncio.sleep(0.01)
            else:
                stalled = True  # the server stopped reading us
                break
            raw.call("echo.v1.echo", [payload])
            sent += 1
            await asyncio.sleep(0)
        growth = rss_bytes() - rss_before
        print(
            f"\n[never reads] sent {sent} MiB of requests, stalled={stalled}, "
            f"RSS +{growth / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB)"
        )
        assert stalled, "the server kept reading a peer that never reads"
        assert growth < bound
        await honest.check("peer that never reads")
        assert server.connection_count == 2  # paused, not closed: it may still read later
        raw.close()
        assert await wait_until(lambda: server.connection_count == 1)
