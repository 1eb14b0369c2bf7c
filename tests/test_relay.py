"""The opaque relay: end to end through it, what it sees (ciphertext only), what tampering does,
many connections at once, and closing either side."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hostile_helpers import MARKER, HonestProbe, client, serving, sock_path, sock_uri, wait_until
from structlog.testing import capture_logs

import vrpc
import vrpc.relay
from services.echo import Echo
from vrpc.relay import Relay


class TapPipe(vrpc.relay._Pipe):
    """Records every byte relayed (both directions); flips one byte when asked to."""

    tap: list[bytes] = []
    tamper_next = False

    def data_received(self, data: bytes) -> None:
        TapPipe.tap.append(bytes(data))
        if TapPipe.tamper_next and self.relay._pipes and len(data) > 10:
            TapPipe.tamper_next = False
            flipped = bytearray(data)
            flipped[len(data) // 2] ^= 0x01
            data = bytes(flipped)
        super().data_received(data)


@pytest.fixture
def tapping(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[TapPipe]]:
    TapPipe.tap = []
    TapPipe.tamper_next = False
    monkeypatch.setattr(vrpc.relay, "_Pipe", TapPipe)
    yield TapPipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def relayed(tmp_path: Path) -> AsyncIterator[tuple[str, str, Relay]]:
    """(server uri, relay uri, relay) with a server on a Unix socket behind the relay."""
    server_uri = sock_uri(tmp_path, "server")
    relay_uri = sock_uri(tmp_path, "relay")
    async with serving(server_uri):
        relay = Relay(relay_uri, server_uri)
        await relay.start()
        try:
            yield server_uri, relay_uri, relay
        finally:
            await relay.close()


@pytest.mark.parametrize("front", ["unix", "tcp"])
async def test_client_through_the_relay(tmp_path: Path, front: str) -> None:
    server_uri = sock_uri(tmp_path, "server")
    relay_uri = (
        sock_uri(tmp_path, "relay") if front == "unix" else f"tcp://127.0.0.1:{_free_port()}"
    )
    async with serving(server_uri):
        relay = Relay(relay_uri, server_uri)
        await relay.start()
        try:
            async with client(relay_uri) as c:
                echo = c.stub(Echo)
                assert await echo.echo(b"via relay") == b"via relay"
                items = [item async for item in echo.stream(1000, 20)]
                assert items == [b"\x5a" * 1000] * 20
            assert relay.connections == 1
            assert relay.bytes_relayed > 20 * 1000
        finally:
            await relay.close()


async def test_relay_sees_no_plaintext(
    tapping: type[TapPipe], relayed: tuple[str, str, Relay]
) -> None:
    _, relay_uri, _ = relayed
    async with client(relay_uri) as c:
        assert await c.stub(Echo).echo(MARKER) == MARKER
    wire = b"".join(tapping.tap)
    assert len(wire) > 2 * len(MARKER)  # the marker went through, both ways
    assert MARKER not in wire
    assert MARKER[:16] not in wire and MARKER[-16:] not in wire


async def test_relay_tap_catches_a_plaintext_session(
    tapping: type[TapPipe], tmp_path: Path
) -> None:
    # The tap itself works: with a plaintext session the marker is there in the clear.
    server_uri, relay_uri = sock_uri(tmp_path, "server"), sock_uri(tmp_path, "relay")
    async with serving(server_uri, allow_plaintext=True):
        relay = Relay(relay_uri, server_uri)
        await relay.start()
        try:
            async with vrpc.connect(relay_uri, plaintext=True) as c:
                assert await c.stub(Echo).echo(MARKER) == MARKER
        finally:
            await relay.close()
    assert MARKER in b"".join(tapping.tap)


async def test_tampering_relay_breaks_only_that_session(
    tapping: type[TapPipe], relayed: tuple[str, str, Relay]
) -> None:
    server_uri, relay_uri, _ = relayed
    async with HonestProbe(server_uri) as honest, client(relay_uri, retries=0) as c:
        echo = c.stub(Echo)
        assert await echo.echo(b"before") == b"before"
        with capture_logs() as logs:
            tapping.tamper_next = True
            with pytest.raises(vrpc.RpcError) as err:
                async for _ in echo.stream(100, 3):  # not idempotent: no silent retry
                    pass
        print(f"\n[tamper] client saw {err.value.status.name}: {err.value.message}")
        assert err.value.status is vrpc.Status.UNAVAILABLE
        reasons = [str(e.get("error")) for e in logs if e.get("reason") == "protocol violation"]
        assert reasons == ["record authentication failed"], logs
        await honest.check("tampering relay")


async def test_fifty_concurrent_connections(relayed: tuple[str, str, Relay]) -> None:
    _, relay_uri, relay = relayed

    async def one(i: int) -> bytes:
        async with client(relay_uri) as c:
            return await c.stub(Echo).echo(i.to_bytes(2, "big") * 100)

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), 60)
    assert results == [i.to_bytes(2, "big") * 100 for i in range(50)]
    assert relay.connections == 50
    assert await wait_until(lambda: relay.active_pipes == 0)


async def test_client_closing_closes_the_upstream(relayed: tuple[str, str, Relay]) -> None:
    _server_uri, relay_uri, relay = relayed
    _reader, writer = await asyncio.open_unix_connection(sock_path(relay_uri))
    writer.write(b"\x01")  # anything: the relay has no idea what it is
    assert await wait_until(lambda: relay.active_pipes == 2)
    writer.close()
    await writer.wait_closed()
    assert await wait_until(lambda: relay.active_pipes == 0)


async def test_server_closing_closes_the_client(tmp_path: Path) -> None:
    upstream_uri, relay_uri = sock_uri(tmp_path, "up"), sock_uri(tmp_path, "relay")
    accepted: list[asyncio.StreamWriter] = []

    async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    upstream = await asyncio.start_unix_server(on_conn, sock_path(upstream_uri))
    relay = Relay(relay_uri, upstream_uri)
    await relay.start()
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path(relay_uri))
        assert await wait_until(lambda: len(accepted) == 1)
        accepted[0].write(b"bye")
        accepted[0].close()
        got = await asyncio.wait_for(reader.read(), 5)  # EOF arrives: the read ends
        assert got == b"bye"
        writer.close()
        assert await wait_until(lambda: relay.active_pipes == 0)
    finally:
        await relay.close()
        upstream.close()
        await upstream.wait_closed()


async def test_unreachable_upstream_closes_the_client(tmp_path: Path) -> None:
    relay_uri = sock_uri(tmp_path, "relay")
    relay = Relay(relay_uri, sock_uri(tmp_path, "nobody"))
    await relay.start()
    try:
        with capture_logs() as logs:
            reader, writer = await asyncio.open_unix_connection(sock_path(relay_uri))
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert any(e["event"] == "relay upstream unreachable" for e in logs)
    finally:
        await relay.close()


async def test_bytes_and_eof_sent_before_the_upstream_is_up_arrive(tmp_path: Path) -> None:
    upstream_uri, relay_uri = sock_uri(tmp_path, "up"), sock_uri(tmp_path, "relay")
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await received.put(await r.read())  # everything until EOF
        w.write(b"answer")
        w.close()

    upstream = await asyncio.start_unix_server(on_conn, sock_path(upstream_uri))
    relay = Relay(relay_uri, upstream_uri)
    await relay.start()
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path(relay_uri))
        writer.write(b"early bytes")
        writer.write_eof()  # before the relay's upstream connection can exist
        assert await asyncio.wait_for(received.get(), 5) == b"early bytes"
        assert await asyncio.wait_for(reader.read(), 5) == b"answer"
        writer.close()
        assert await wait_until(lambda: relay.active_pipes == 0)
    finally:
        await relay.close()
        upstream.close()
        await upstream.wait_closed()
