"""Hostile peers before the session exists: slowloris, oversize handshake frames, connection floods.

Each test runs a real server on a Unix socket, misbehaves with raw sockets, and checks that only
the bad connection pays while an honest client in parallel keeps getting answers.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from hostile_helpers import (
    HonestProbe,
    read_until_closed,
    serving,
    sock_path,
    sock_uri,
    wait_until,
)
from structlog.testing import capture_logs

from vrpc.proto.handshake import Alert, MsgType, alert_frame


async def test_slowloris_closed_at_handshake_timeout(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri, handshake_timeout=0.3) as server, HonestProbe(uri) as honest:
        conns = [await asyncio.open_unix_connection(sock_path(uri)) for _ in range(5)]
        for _, writer in conns:
            # A few bytes, then silence.
            writer.write(struct.pack(">BI", MsgType.CLIENT_HELLO, 60)[:3])
        assert await wait_until(lambda: server.connection_count == 6)
        with capture_logs() as logs:
            for reader, _ in conns:
                # The server closes on its own (without the timeout this read waits 5 s and fails).
                await read_until_closed(reader, timeout=5)
        assert any(e.get("reason") == "handshake timed out" for e in logs), logs
        assert await wait_until(lambda: server.connection_count == 1)
        for _, writer in conns:
            writer.close()
        await honest.check("slowloris")


async def test_oversize_handshake_prefix_closes_without_buffering(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        reader, writer = await asyncio.open_unix_connection(sock_path(uri))
        with capture_logs() as logs:
            # A CLIENT_HELLO that claims 4 GiB: refused from the header alone.
            writer.write(struct.pack(">BI", MsgType.CLIENT_HELLO, 0xFFFFFFFF) + b"x" * 100)
            await read_until_closed(reader, timeout=5)
        assert any("exceeds" in str(e.get("reason", "")) for e in logs), logs
        writer.close()
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("oversize handshake prefix")


async def test_garbage_instead_of_hello(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        tls_hello = b"\x16\x03\x01\x02\x00" + b"\x01" * 64
        for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 64, tls_hello):
            reader, writer = await asyncio.open_unix_connection(sock_path(uri))
            writer.write(junk)
            await read_until_closed(reader, timeout=5)
            writer.close()
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("garbage hello")


async def test_many_idle_connections_and_the_connection_limit(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    limit = 200
    # max_handshakes as high as the connection limit: this test is about the latter.
    server_cm = serving(uri, max_connections=limit, max_handshakes=limit, handshake_timeout=30)
    async with server_cm as server, HonestProbe(uri) as honest:  # the honest one takes a slot
        idle = [await asyncio.open_unix_connection(sock_path(uri)) for _ in range(limit - 1)]
        for _, writer in idle[::2]:
            writer.write(b"\x01\x00")  # half of them a partial header, then silence
        assert await wait_until(lambda: server.connection_count == limit)
        with capture_logs() as logs:
            extra = [await asyncio.open_unix_connection(sock_path(uri)) for _ in range(20)]
            for reader, _ in extra:
                # Refused beyond the limit: an ALERT saying why, then closed at once.
                refusal = await read_until_closed(reader, timeout=5)
                assert refusal == alert_frame(Alert.CONNECTION_LIMIT)
        refused = [e for e in logs if e.get("reason") == "connection limit"]
        assert len(refused) == 20
        assert server.connection_count == limit
        await honest.check(f"{limit} idle connections")
        for _, writer in idle + extra:
            writer.close()
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("after the idle ones left")


async def test_half_open_connections_are_released(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri, handshake_timeout=30) as server, HonestProbe(uri) as honest:
        half = [await asyncio.open_unix_connection(sock_path(uri)) for _ in range(50)]
        for _, writer in half:
            writer.write(b"\x01\x00")
            writer.write_eof()  # the handshake can never finish: no reason to keep the slot
        # Released long before the 30 s handshake timeout.
        assert await wait_until(lambda: server.connection_count == 1)
        for _, writer in half:
            writer.close()
        await honest.check("50 half-open connections")
