"""Resource attacks over a real Unix socket: every resource a hostile peer can take is bounded.

Each test scales an attack down (smaller limits set on the server) so it runs in a second or
two, and checks that only the offender lost its connection while an honest client calling in a
loop alongside kept getting every answer right (HonestProbe compares each echo with what it sent
and fails on any error). The printed latency is what the honest client saw (`-s`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hostile_helpers import (
    Hold,
    HoldImpl,
    HonestProbe,
    RawSession,
    SlowAttester,
    client,
    client_hello,
    empty_data_record,
    key_update_record,
    read_until_closed,
    rss_bytes,
    serving,
    sock_path,
    sock_uri,
    wait_until,
)
from structlog.testing import capture_logs

import vrpc
from services.echo import Echo, EchoImpl
from vrpc.proto.connection import INITIAL_WINDOW
from vrpc.proto.events import ErrorReceived, ResponseReceived
from vrpc.proto.handshake import Alert, alert_frame
from vrpc.proto.record import REC_DATA

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
async def _close_raw_sessions() -> AsyncIterator[None]:
    yield
    await RawSession.close_all()


def _reasons(logs: list[dict[str, object]]) -> str:
    return " | ".join(f"{e.get('reason')}: {e.get('error')}" for e in logs)


# -- handshake admission -----------------------------------------------------------------------


async def test_hello_announcing_one_byte_records_is_refused(tmp_path: Path) -> None:
    # It used to be served: a 256 KiB PING then came back as 262,144 one-byte records.
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        for value in (1, 64, 511):
            reader, writer = await asyncio.open_unix_connection(sock_path(uri))
            with capture_logs() as logs:
                writer.write(client_hello(max_record=value))
                assert await read_until_closed(reader) == alert_frame(Alert.BAD_MESSAGE)
            assert "below the minimum of 512" in _reasons(logs)
            writer.close()
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("hello with max_record=1")


async def test_bytes_sent_while_attesting_close_the_connection_unbuffered(tmp_path: Path) -> None:
    # A valid hello, then megabytes while the (slow, threaded) attester runs: refused at the
    # first chunk; the server buffers none of it.
    uri = sock_uri(tmp_path)
    slow = SlowAttester(0.3)
    async with serving(uri, attester=slow) as server, HonestProbe(uri) as honest:
        before = rss_bytes()
        reader, writer = await asyncio.open_unix_connection(sock_path(uri))
        writer.write(client_hello())
        await wait_until(lambda: slow.running == 1)
        with capture_logs() as logs:
            try:
                for _ in range(64):  # up to 16 MiB; the server closes long before
                    writer.write(bytes(256 * 1024))
                    await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                pass
            await read_until_closed(reader)
        assert "before the handshake allowed it" in _reasons(logs)
        grown = rss_bytes() - before
        print(f"\n[bytes while attesting] server RSS growth {grown / MiB:.1f} MiB")
        assert grown < 8 * MiB
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("bytes while attesting")


async def test_hello_flood_is_bounded_by_the_handshake_and_attestation_limits(
    tmp_path: Path,
) -> None:
    # One fixed hello replayed on 60 connections at once, against a server whose attester
    # takes 50 ms in a thread: at most 8 handshakes are admitted, at most 2 attest at once, the
    # rest are refused with HANDSHAKE_LIMIT before any key exchange.
    uri = sock_uri(tmp_path)
    slow = SlowAttester(0.05)
    hello = client_hello()
    options = {
        "attester": slow,
        "max_handshakes": 8,
        "max_attestations": 2,
        "handshake_timeout": 2.0,  # the replayed hello never finishes: its slot ends here
    }
    async with serving(uri, **options) as server, HonestProbe(uri) as honest:
        calls_before = slow.calls

        async def replay() -> bytes:
            reader, writer = await asyncio.open_unix_connection(sock_path(uri))
            writer.write(hello)
            try:
                return await read_until_closed(reader, timeout=10)
            finally:
                writer.close()

        answers = await asyncio.gather(*(replay() for _ in range(60)))
        refused = [a for a in answers if a == alert_frame(Alert.HANDSHAKE_LIMIT)]
        served = [a for a in answers if a != alert_frame(Alert.HANDSHAKE_LIMIT)]
        print(f"\n[hello flood] {len(served)} attested, {len(refused)} refused (HANDSHAKE_LIMIT)")
        assert refused and len(served) >= 8
        assert server.metrics.connections_refused["handshake_limit"] == len(refused)
        assert slow.most <= 2
        assert slow.calls - calls_before == len(served)
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("hello flood")
        # Once the flood is over a new client gets in.
        async with client(uri, timeout=10.0) as c:
            assert await c.stub(Echo).echo(b"after") == b"after"


async def test_a_client_refused_for_the_handshake_limit_is_told_to_retry(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    slow = SlowAttester(0.5)
    async with serving(uri, attester=slow, max_handshakes=1) as server:
        _reader, writer = await asyncio.open_unix_connection(sock_path(uri))
        writer.write(client_hello())  # holds the only handshake slot while it attests
        assert await wait_until(lambda: slow.running == 1)
        with pytest.raises(vrpc.RpcError) as info:
            async with client(uri, timeout=2.0) as c:
                await c.stub(Echo).echo(b"x")
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert "busy with handshakes" in info.value.message
        writer.close()
        assert await wait_until(lambda: server.connection_count == 0)


# -- records -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty DATA", "KEY_UPDATE"])
async def test_empty_record_floods_are_refused(tmp_path: Path, kind: str) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri) as server:
        raw = await RawSession.open(uri)
        make = empty_data_record if kind == "empty DATA" else key_update_record
        # Made before the honest client starts: the test's own work would show as its latency.
        flood = b"".join(make(raw.session) for _ in range(20_000))
        async with HonestProbe(uri) as honest:
            await _flood(server, raw, flood, kind, honest)


async def _flood(
    server: vrpc.Server, raw: RawSession, flood: bytes, kind: str, honest: HonestProbe
) -> None:
    started = time.perf_counter()
    with capture_logs() as logs:
        raw.send_wire(flood)
        assert await raw.closed_by_server()
    print(f"\n[{kind} flood] closed after {(time.perf_counter() - started) * 1000:.1f} ms")
    assert "too many empty or KEY_UPDATE records" in _reasons(logs)
    assert await wait_until(lambda: server.connection_count == 1)
    await honest.check(f"{kind} flood")


async def test_unknown_record_type_is_refused_from_its_header(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        with capture_logs() as logs:
            # Only the header of a 60,000-byte record of type 0x99: nothing more is awaited.
            raw.send_wire(bytes([0x99]) + (60_000).to_bytes(4, "big"))
            assert await raw.closed_by_server(timeout=2.0)
        assert "malformed record header" in _reasons(logs)
        assert await wait_until(lambda: server.connection_count == 1)
        await honest.check("unknown record type")


# -- partial messages and the memory budget ----------------------------------------------------


async def test_trickled_frames_are_closed_at_the_message_timeout(tmp_path: Path) -> None:
    # 10 connections announce a 1 MiB frame, send all but 100 bytes, then trickle: each closes
    # message_timeout after its first partial byte, however many bytes trickle in.
    uri = sock_uri(tmp_path)
    async with serving(uri, message_timeout=0.5) as server, HonestProbe(uri) as honest:
        raws = [await RawSession.open(uri) for _ in range(10)]
        with capture_logs() as logs:
            started = time.perf_counter()
            for raw in raws:
                raw.send_plain(MiB.to_bytes(4, "big") + bytes(MiB - 100))
            assert await wait_until(lambda: server.buffered_bytes >= 5 * MiB)
            for _ in range(3):
                for raw in raws:
                    if not raw.writer.is_closing():
                        raw.send_plain(b"\x00")  # "activity", never completion
                await asyncio.sleep(0.1)
            assert await wait_until(lambda: server.connection_count == 1)
            took = time.perf_counter() - started
        closes = [e for e in logs if "message_timeout" in str(e.get("reason"))]
        assert len(closes) == 10, _reasons(logs)
        print(f"\n[trickled frames] all 10 closed {took:.2f} s after the attack began")
        assert server.buffered_bytes == 0
        await honest.check("trickled 1 MiB frames")


async def test_the_memory_budget_sheds_the_oldest_holders_not_the_honest(tmp_path: Path) -> None:
    # Budget 3 MiB; 4 peers each park a 1 MiB partial frame (sent one after another). The
    # budget is exceeded by the 4th: the oldest holder is shed. An honest client then sends
    # 700 KB messages: its partial input is the newest, so the attackers go first, never it.
    uri = sock_uri(tmp_path)
    options = {"max_buffered": 3 * MiB, "message_timeout": 30.0}
    async with serving(uri, **options) as server, HonestProbe(uri) as honest:
        raws = [await RawSession.open(uri) for _ in range(4)]
        with capture_logs() as logs:
            for i, raw in enumerate(raws):
                raw.send_plain(MiB.to_bytes(4, "big") + bytes(MiB - 1))

                def arrived(i: int = i) -> bool:
                    shed = server.metrics.connections_refused.get("memory_budget", 0)
                    return server.buffered_bytes >= (i + 1 - shed) * (MiB - 8)

                assert await wait_until(arrived, 3)
            assert await raws[0].closed_by_server(timeout=3.0)
            assert server.buffered_bytes <= 3 * MiB
            async with client(uri, timeout=10.0) as c:
                big = bytes(range(256)) * 2800  # 716,800 bytes
                for _ in range(3):
                    assert await c.stub(Echo).echo(big) == big
        shed = [e for e in logs if e.get("event") == "connection shed"]
        assert 1 <= len(shed) <= 4
        assert all(e.get("reason") == "server memory budget" for e in shed)
        print(
            f"\n[memory budget] {len(shed)} of 4 attackers shed; budget 3 MiB, "
            f"held now {server.buffered_bytes / MiB:.2f} MiB"
        )
        assert server.buffered_bytes <= 3 * MiB
        await honest.check("memory budget")


async def test_record_header_of_an_oversize_partial_record_is_still_bounded(
    tmp_path: Path,
) -> None:
    # A partial DATA record counts in the budget and the message timeout like a partial frame.
    uri = sock_uri(tmp_path)
    async with serving(uri, message_timeout=0.3) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        raw.send_wire(bytes([REC_DATA]) + (65536 + 16).to_bytes(4, "big") + bytes(60_000))
        assert await wait_until(lambda: server.buffered_bytes >= 60_000)
        assert await raw.closed_by_server(timeout=3.0)
        assert server.buffered_bytes == 0 and server.connection_count == 1
        await honest.check("partial record")


async def test_a_hand_driven_session_is_served_under_tight_limits(tmp_path: Path) -> None:
    # The baseline the attacks above depart from: a raw session calling honestly is served,
    # with the message timeout and the budget as tight as the tests above set them.
    uri = sock_uri(tmp_path)
    async with serving(uri, message_timeout=0.5, max_buffered=MiB):
        raw = await RawSession.open(uri)
        raw.call("echo.v1.echo", [b"x" * 1000])
        (ev,) = await raw.events()
        assert isinstance(ev, ResponseReceived) and ev.result == b"x" * 1000
        raw.close()


async def test_a_peer_that_never_reads_is_shed_when_its_output_exceeds_the_budget(
    tmp_path: Path,
) -> None:
    # Paused (not closed) at the 4 MiB write high-water mark by default; with a 2 MiB budget
    # the output it leaves queued counts, and it is shed.
    uri = sock_uri(tmp_path)
    payload = b"\xa5" * MiB
    async with serving(uri, max_buffered=2 * MiB) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        with capture_logs() as logs:
            closed = False
            for _ in range(40):  # 40 MiB of answers if nothing stopped it
                try:
                    raw.call("echo.v1.echo", [payload])
                    await asyncio.wait_for(raw.writer.drain(), 5)
                except (ConnectionResetError, BrokenPipeError):
                    closed = True
                    break
                if server.connection_count == 1:
                    closed = True
                    break
                await asyncio.sleep(0.01)
            assert closed or await wait_until(lambda: server.connection_count == 1)
        shed = [e for e in logs if e.get("event") == "connection shed"]
        assert len(shed) == 1 and shed[0]["held"] >= 2 * MiB  # type: ignore[operator]
        assert server.buffered_bytes == 0
        await honest.check("peer that never reads, small budget")


async def test_limit_parameters_are_checked_and_reach_the_endpoints(tmp_path: Path) -> None:
    bad_values: list[dict[str, int]] = [
        {"max_handshakes": 0},
        {"max_attestations": 0},
        {"max_buffered": 0},
        {"max_in_flight_bytes": 0},
    ]
    for bad in bad_values:
        with pytest.raises(ValueError, match=next(iter(bad))):
            vrpc.Server([], attester=SlowAttester(0), **bad)
    defaults = vrpc.Server([], attester=SlowAttester(0))
    assert (defaults.max_buffered, defaults.max_in_flight_bytes) == (256 * MiB, 128 * MiB)
    with pytest.raises(ValueError, match="message_timeout"):
        vrpc.Server([], attester=SlowAttester(0), message_timeout=0)
    with pytest.raises(ValueError, match="message_timeout"):
        client("unix:///nowhere", message_timeout=-1)
    uri = sock_uri(tmp_path)
    async with serving(uri, message_timeout=7.0) as server, client(uri, message_timeout=9.0) as c:
        assert await c.stub(Echo).echo(b"x") == b"x"
        (conn,) = server._connections
        assert conn.endpoint._message_timeout == 7.0
        assert c._proto is not None and c._proto.endpoint._message_timeout == 9.0


# -- what calls in flight hold -------------------------------------------------------------------


async def test_large_calls_to_slow_handlers_are_refused_past_the_in_flight_bytes(
    tmp_path: Path,
) -> None:
    # A peer calling a handler that waits (a KMS call, a lock) with 1 MiB arguments: without the
    # limit every call's arguments stay in memory until its handler returns, up to
    # max_concurrent_calls of them (16,384 x 4 MiB by default).
    uri = sock_uri(tmp_path)
    impl = HoldImpl()
    limit = 3 * MiB + 64 * 1024
    data = b"\x3c" * (MiB - 64)
    async with (
        serving(uri, [impl, EchoImpl()], max_in_flight_bytes=limit) as server,
        HonestProbe(uri) as honest,
    ):
        raw = await RawSession.open(uri)
        ids = [raw.call("hold.v1.hold", [data]) for _ in range(8)]
        refused: dict[int, Any] = {}
        for _ in range(20):
            if len(refused) == 5:
                break
            for ev in await raw.events():
                assert isinstance(ev, ErrorReceived), ev
                refused[ev.call_id] = ev
        assert sorted(refused) == ids[3:]  # the first three fit, in arrival order
        for ev in refused.values():
            assert ev.status is vrpc.Status.RESOURCE_EXHAUSTED
            assert f"(limit {limit})" in ev.message
        assert impl.entered == 3
        assert 3 * len(data) < server.in_flight_bytes <= limit
        await honest.check("three 1 MiB calls held, five refused")  # small calls still fit
        impl.gate.set()
        answers: list[Any] = []
        for _ in range(20):
            if len(answers) == 3:
                break
            answers += await raw.events()
        assert [(a.call_id, a.result) for a in answers] == [(i, len(data)) for i in ids[:3]]
        assert await wait_until(lambda: server.in_flight_bytes == 0)
        call_id = raw.call("hold.v1.hold", [data])  # nothing held now: served again
        (ev,) = await raw.events()
        assert isinstance(ev, ResponseReceived) and (ev.call_id, ev.result) == (call_id, len(data))
        raw.close()
        await honest.check("after the held calls")


async def test_one_call_heavier_than_the_limit_still_runs_alone(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path)
    impl = HoldImpl()
    impl.gate.set()
    async with serving(uri, [impl], max_in_flight_bytes=MiB) as server, client(uri) as c:
        assert await c.stub(Hold).hold(b"x" * (2 * MiB)) == 2 * MiB
        assert server.in_flight_bytes == 0


async def test_a_request_stream_weighs_its_window(tmp_path: Path) -> None:
    # Its window lets the client send INITIAL_WINDOW bytes of items before the handler reads.
    uri = sock_uri(tmp_path)
    impl = HoldImpl()
    limit = INITIAL_WINDOW + 64 * 1024

    async def items() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 1000

    async with serving(uri, [impl], max_in_flight_bytes=limit) as server, client(uri) as c:
        hold = c.stub(Hold)
        first = asyncio.create_task(hold.take(items()))
        assert await wait_until(lambda: impl.entered == 1)
        assert INITIAL_WINDOW < server.in_flight_bytes <= limit
        with pytest.raises(vrpc.RpcError) as info:
            await asyncio.wait_for(hold.take(items()), 5)
        assert info.value.status is vrpc.Status.RESOURCE_EXHAUSTED
        small = asyncio.create_task(hold.hold(b"z" * 1000))  # a small unary call still fits
        assert await wait_until(lambda: impl.entered == 2)
        impl.gate.set()
        assert await asyncio.wait_for(first, 5) == 4000
        assert await asyncio.wait_for(small, 5) == 1000
        assert await wait_until(lambda: server.in_flight_bytes == 0)


async def test_a_call_cancelled_before_it_starts_gives_its_bytes_back(tmp_path: Path) -> None:
    # A REQUEST and its CANCEL in one read: the handler task never runs its first step.
    uri = sock_uri(tmp_path)
    impl = HoldImpl()
    async with serving(uri, [impl], max_in_flight_bytes=4 * MiB) as server:
        raw = await RawSession.open(uri)
        for _ in range(3):
            call_id = raw.conn.start_call("hold.v1.hold", [b"c" * MiB], now=time.monotonic())
            raw.conn.cancel(call_id)
            out = raw.conn.data_to_send()
            assert out is not None
            raw.send_plain(bytes(out))
        assert await wait_until(lambda: server.in_flight_bytes == 0 and not server.calls_in_flight)
        assert impl.entered == 0
        call_id = raw.call("hold.v1.hold", [b"d" * (3 * MiB)])  # all 4 MiB are free again
        impl.gate.set()
        (ev,) = await raw.events()
        assert isinstance(ev, ResponseReceived) and ev.result == 3 * MiB
        raw.close()


async def test_a_request_of_tiny_containers_is_refused_and_freed(tmp_path: Path) -> None:
    # 200,000 empty maps: ~200 KB on the wire, ~14 MiB once decoded. echo takes bytes: the call
    # is refused, nothing of it stays, and the connection serves the next call.
    uri = sock_uri(tmp_path)
    async with serving(uri) as server, HonestProbe(uri) as honest:
        raw = await RawSession.open(uri)
        call_id = raw.call("echo.v1.echo", [[{}] * 200_000])
        (ev,) = await raw.events()
        assert isinstance(ev, ErrorReceived) and ev.call_id == call_id
        assert ev.status is vrpc.Status.INVALID_ARGUMENT
        assert ev.details == {"parameter": "data"}
        assert server.in_flight_bytes == 0 and server.calls_in_flight <= 1  # the probe's own
        call_id = raw.call("echo.v1.echo", [b"after"])
        (ev,) = await raw.events()
        assert isinstance(ev, ResponseReceived) and ev.result == b"after"
        raw.close()
        await honest.check("a request of tiny containers")
