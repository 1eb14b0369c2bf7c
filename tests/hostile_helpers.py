"""Helpers for the hostile-peer, fault, relay and log-hygiene tests.

A real server with the insecure test attester on a Unix socket, an honest client to measure how
the server treats good peers while a bad one misbehaves, and a hand-driven client session (the
handshake state machine plus the record layer over a raw stream) to craft what no honest client
would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import typing
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import vrpc
from services.echo import Echo, EchoImpl
from vrpc._verify import handshake_verifier
from vrpc.proto.connection import Connection, Role
from vrpc.proto.events import SettingsReceived
from vrpc.proto.handshake import ClientHandshake, HandshakeComplete
from vrpc.proto.record import Session

# A payload no protocol byte sequence would contain by accident: tests look for it in captures.
MARKER = b"VRPC-PLAINTEXT-MARKER:" + bytes(range(0x41, 0x41 + 42))
assert len(MARKER) == 64


@functools.cache
def attester() -> vrpc.InsecureTestAttester:
    os.environ["VRPC_INSECURE_TEST_ATTESTATION"] = "1"
    return vrpc.InsecureTestAttester(seed=b"hostile-tests")


def client(uri: str, **options: Any) -> vrpc.Client:
    att = attester()
    return vrpc.connect(uri, policy=att.policy(), root=att.trust_root(), **options)


class Slow(vrpc.Service, name="slow.v1"):
    @vrpc.rpc
    async def sleep(self, seconds: float) -> str:
        raise NotImplementedError

    @vrpc.rpc
    async def boom(self) -> str:
        raise NotImplementedError

    @vrpc.rpc
    async def block(self, seconds: float) -> str:
        raise NotImplementedError

    @vrpc.rpc
    def ticks(self, count: int, size: int) -> AsyncIterator[bytes]:
        raise NotImplementedError


class SlowImpl(Slow):
    """Handlers that misbehave on purpose; records what happened to them."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.started: list[str] = []
        self.entered = asyncio.Event()

    async def sleep(self, seconds: float) -> str:
        self.started.append("sleep")
        self.entered.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.append("sleep")
            raise
        return "slept"

    async def boom(self) -> str:
        raise ZeroDivisionError("handler bug")

    async def block(self, seconds: float) -> str:
        time.sleep(seconds)  # noqa: ASYNC251 - deliberately blocks the event loop
        return "blocked"

    async def ticks(self, count: int, size: int) -> AsyncIterator[bytes]:
        self.started.append("ticks")
        self.entered.set()
        try:
            for _ in range(count):
                yield b"t" * size
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append("ticks")
            raise


class Hold(vrpc.Service, name="hold.v1"):
    @vrpc.rpc
    async def hold(self, data: bytes) -> int:
        raise NotImplementedError

    @vrpc.rpc
    async def take(self, items: AsyncIterator[bytes]) -> int:
        raise NotImplementedError


class HoldImpl(Hold):
    """Handlers that keep their arguments until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0

    async def hold(self, data: bytes) -> int:
        self.entered += 1
        await self.gate.wait()
        return len(data)

    async def take(self, items: AsyncIterator[bytes]) -> int:
        self.entered += 1
        await self.gate.wait()
        total = 0
        async for item in items:
            total += len(item)
        return total


async def read_until_closed(
    reader: asyncio.StreamReader, timeout: float = 5.0, reads: int = 10_000
) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed); bounded in reads
    and in the wait for each."""
    got = bytearray()
    try:
        for _ in range(reads):
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return bytes(got)


def sock_uri(tmp_path: Path, name: str = "s") -> str:
    return f"unix://{tmp_path / (name + '.sock')}"


def sock_path(uri: str) -> str:
    return uri.removeprefix("unix://")


@contextlib.asynccontextmanager
async def serving(
    uri: str, services: Sequence[vrpc.Service] | None = None, **options: Any
) -> AsyncIterator[vrpc.Server]:
    options.setdefault("attester", attester())
    server = vrpc.Server(list(services) if services is not None else [EchoImpl()], **options)
    await server.start(uri)
    try:
        yield server
    finally:
        await server.close(grace=0)


class HonestProbe:
    """An honest client calling echo in a loop while something hostile happens; records latency."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        async with client(self.uri, timeout=10.0) as c:
            echo = c.stub(Echo)
            for i in range(100_000):  # bounded; stopped long before
                if self._stop.is_set():
                    return
                payload = i.to_bytes(4, "big") * 8
                started = time.perf_counter()
                try:
                    got = await echo.echo(payload)
                    assert got == payload
                except Exception as exc:
                    self.errors.append(exc)
                    return
                self.latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.005)

    async def __aenter__(self) -> HonestProbe:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        # Make sure it is through its handshake before the hostile part starts.
        for _ in range(500):
            if self.latencies or self.errors:
                break
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 15)

    async def check(self, label: str) -> None:
        """At least one fresh answer now, and no errors so far; prints the latency figures."""
        before = len(self.latencies)
        for _ in range(1000):
            if len(self.latencies) > before or self.errors:
                break
            await asyncio.sleep(0.01)
        assert not self.errors, self.errors
        assert len(self.latencies) > before, "the honest client got no answer"
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1000
        worst = lat[-1] * 1000
        print(f"\n[{label}] honest client: {len(lat)} calls, p50 {p50:.2f} ms, max {worst:.2f} ms")


async def open_stream(uri: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Raw streams over any vrpc transport URI (vsock:// in the lab)."""
    from vrpc.transport import create_connection

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, protocol = await create_connection(uri, lambda: asyncio.StreamReaderProtocol(reader))
    writer = asyncio.StreamWriter(
        typing.cast(asyncio.WriteTransport, transport), protocol, reader, loop
    )
    return reader, writer


class RawSession:
    """A client session driven by hand over a raw Unix stream: handshake, then records."""

    opened: typing.ClassVar[list[asyncio.StreamWriter]] = []

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        leftover: bytes,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.session = session
        self.conn = Connection(Role.CLIENT)
        self._leftover = leftover

    @classmethod
    async def open(cls, uri: str, *, plaintext: bool = False) -> RawSession:
        if uri.startswith("unix://"):
            reader, writer = await asyncio.open_unix_connection(sock_path(uri))
        else:
            reader, writer = await open_stream(uri)
        cls.opened.append(writer)
        if plaintext:
            hs = ClientHandshake(mode="plaintext", verify=None)
        else:
            att = attester()
            verify = handshake_verifier(vrpc.Verifier(att.policy(), att.trust_root()))
            hs = ClientHandshake(mode="dev-insecure", verify=verify)
        hs.initiate()
        writer.write(hs.data_to_send())
        for _ in range(100):
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                raise ConnectionError("server closed during the handshake")
            for ev in hs.receive_data(data, time.time()):
                if isinstance(ev, HandshakeComplete):
                    writer.write(hs.data_to_send())
                    return cls(reader, writer, ev.session, ev.trailing)
            out = hs.data_to_send()
            if out:
                writer.write(out)
        raise ConnectionError("handshake did not complete")

    def send_plain(self, plaintext: bytes) -> list[bytes]:
        """Seal ``plaintext`` (message-stream bytes) and write it; returns the wire records."""
        records = self.session.seal(plaintext)
        self.writer.writelines(records)
        return records

    def send_wire(self, data: bytes) -> None:
        self.writer.write(data)

    def call(self, method: str, args: list[Any], **kw: Any) -> int:
        call_id = self.conn.start_call(method, args, now=time.monotonic(), **kw)
        out = self.conn.data_to_send()
        assert out is not None
        self.send_plain(bytes(out))
        return call_id

    def send_request_body(self, body: bytes) -> None:
        """Send a hand-encoded REQUEST body as call 1 (registered so its answer is delivered)."""
        self.conn.start_call("placeholder", [], now=time.monotonic())
        self.conn.data_to_send()  # dropped: ``body`` goes instead
        self.send_plain(len(body).to_bytes(4, "big") + body)

    async def events(self, timeout: float = 5.0) -> list[Any]:
        """Read until at least one event arrives (or EOF: then an empty list)."""
        if self._leftover:
            data, self._leftover = self._leftover, b""
        else:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        for _ in range(1000):
            if not data:
                return []
            plain = self.session.receive(data)
            if plain:
                # The server's SETTINGS opens every session; the tests here look past it.
                evs = [
                    e
                    for e in self.conn.receive_data(plain, time.monotonic())
                    if not isinstance(e, SettingsReceived)
                ]
                if evs:
                    return evs
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        raise AssertionError("no event")

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server closed the stream (reads until EOF or a reset)."""
        try:
            for _ in range(10_000):
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        return False

    def close(self) -> None:
        self.writer.transport.abort()

    @classmethod
    async def close_all(cls) -> None:
        """Test teardown: close every raw stream a test opened, whatever happened to it."""
        writers, cls.opened[:] = list(cls.opened), []
        for writer in writers:
            writer.transport.abort()
        await asyncio.sleep(0)


async def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` every 10 ms; True as soon as it holds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


class SlowAttester:
    """The test attester behind a blocking delay, run in a thread like /dev/nsm; records how
    many attestations ran at once."""

    insecure = True
    attests_inline = False

    def __init__(self, delay: float) -> None:
        import threading

        self.delay = delay
        self.running = 0
        self.most = 0
        self.calls = 0
        self._lock = threading.Lock()

    def attest(self, **kw: Any) -> bytes:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            return attester().attest(**kw)
        finally:
            with self._lock:
                self.running -= 1


def client_hello(max_record: int | None = None) -> bytes:
    """A valid CLIENT_HELLO (dev-insecure), optionally announcing another ``max_record``."""
    hs = ClientHandshake(mode="dev-insecure", verify=lambda *a, **k: None)
    hs.initiate()
    hello = bytearray(hs.data_to_send())
    if max_record is not None:
        hello[10:14] = max_record.to_bytes(4, "big")  # header(5) + version, mode, suite, flags
    return bytes(hello)


def empty_data_record(session: Any) -> bytes:
    """An authenticated DATA record with no plaintext under ``session``'s sending key (no
    honest sender makes one; RecordSession.seal never does)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from vrpc.proto.keyschedule import traffic_key_iv

    key, iv = traffic_key_iv(session._send_secret)
    hdr = bytes([0x17]) + (16).to_bytes(4, "big")
    nonce = (int.from_bytes(iv, "big") ^ session._send_seq).to_bytes(12, "big")
    session._send_seq += 1
    return hdr + AESGCM(key).encrypt(nonce, b"", hdr)


def key_update_record(session: Any) -> bytes:
    session.request_key_update()
    return b"".join(session.seal(b""))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


__all__ = [
    "MARKER",
    "Echo",
    "EchoImpl",
    "Hold",
    "HoldImpl",
    "HonestProbe",
    "RawSession",
    "Slow",
    "SlowAttester",
    "SlowImpl",
    "attester",
    "client",
    "client_hello",
    "empty_data_record",
    "fd_count",
    "key_update_record",
    "read_until_closed",
    "rss_bytes",
    "serving",
    "sock_path",
    "sock_uri",
    "wait_until",
]


def subprocess_server(attester: Any = None) -> vrpc.Server:
    """``vrpc serve hostile_helpers:subprocess_server`` target for the kill-mid-call test."""
    return vrpc.Server([SlowImpl(), EchoImpl()], attester=attester)
