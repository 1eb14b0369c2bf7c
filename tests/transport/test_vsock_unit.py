"""vrpc.transport.vsock without real vsock traffic.

This machine's vsock belongs to its hypervisor: nothing here may create, bind or connect an AF_VSOCK
socket or query /dev/vsock. A guard replaces the module's socket factory and ioctl for every test;
tests that need a socket hand in a Unix or loopback one. Real vsock runs in tests/vsock (vsock lab).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import uvloop

from vrpc.exceptions import ConnectError, TransportError
from vrpc.transport import vsock

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
BOUND = 10.0


@pytest.fixture(autouse=True)
def no_real_vsock(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Any:
        pytest.fail("a unit test tried to open a vsock socket or /dev/vsock")

    monkeypatch.setattr(vsock, "_new_socket", refuse)
    monkeypatch.setattr(vsock.fcntl, "ioctl", refuse)


def run(loop_name: str, coro_fn: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        return runner.run(asyncio.wait_for(coro_fn(), BOUND))


class Collect(asyncio.Protocol):
    def __init__(self, want: int) -> None:
        self.want = want
        self.data = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want and not self.done.done():
            self.done.set_result(bytes(self.data))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.data))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (Linux's socketpair() is Unix-only)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname(), timeout=BOUND)
        b, _ = listener.accept()
    a.settimeout(None)
    b.settimeout(BOUND)
    return a, b


# --- constants and availability ------------------------------------------------------------------


def test_constants_match_linux_vm_sockets_h() -> None:
    assert vsock.VMADDR_CID_ANY == 0xFFFFFFFF
    assert vsock.VMADDR_CID_LOCAL == 1
    assert vsock.VMADDR_CID_HOST == 2
    assert vsock.VMADDR_PORT_ANY == 0xFFFFFFFF
    assert vsock.IOCTL_VM_SOCKETS_GET_LOCAL_CID == 0x7B9
    if vsock.vsock_available():
        # Where the interpreter knows them, ours must agree.
        assert socket.AF_VSOCK == vsock._SOL_VSOCK
        assert socket.VMADDR_CID_ANY == vsock.VMADDR_CID_ANY
        assert socket.VMADDR_CID_HOST == vsock.VMADDR_CID_HOST
        assert socket.SO_VM_SOCKETS_BUFFER_SIZE == vsock.SO_VM_SOCKETS_BUFFER_SIZE
        assert socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE == vsock.SO_VM_SOCKETS_BUFFER_MAX_SIZE


def test_vsock_available_follows_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert vsock.vsock_available() == hasattr(socket, "AF_VSOCK")
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    assert vsock.vsock_available() is False


@pytest.mark.parametrize("loop_name", LOOPS)
def test_missing_af_vsock_fails_loudly(monkeypatch: pytest.MonkeyPatch, loop_name: str) -> None:
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    with pytest.raises(TransportError, match="no AF_VSOCK support"):
        run(loop_name, lambda: vsock.create_vsock_server(asyncio.Protocol, 1, 50000))
    with pytest.raises(TransportError, match="no AF_VSOCK support"):
        run(loop_name, lambda: vsock.create_vsock_connection(asyncio.Protocol, 1, 50000))


@pytest.mark.parametrize(
    ("cid", "port"),
    [(-1, 50000), (1 << 32, 50000), (1, -1), (1, 1 << 32), (True, 50000), (1, "50000"), (1.0, 5)],
)
def test_bad_addresses_are_refused_before_any_socket(cid: Any, port: Any) -> None:
    if not vsock.vsock_available():
        pytest.skip("this Python has no AF_VSOCK: the availability check comes first")
    with pytest.raises(ValueError, match=r"vsock (cid|port)"):
        run("asyncio", lambda: vsock.create_vsock_connection(asyncio.Protocol, cid, port))
    with pytest.raises(ValueError, match=r"vsock (cid|port)"):
        run("asyncio", lambda: vsock.create_vsock_server(asyncio.Protocol, cid, port))


@pytest.mark.parametrize("size", [0, -1, True, "1", 1.5])
def test_bad_buffer_sizes_are_refused_before_any_socket(size: Any) -> None:
    if not vsock.vsock_available():
        pytest.skip("this Python has no AF_VSOCK: the availability check comes first")
    with pytest.raises(ValueError, match="buffer_size"):
        run(
            "asyncio",
            lambda: vsock.create_vsock_connection(asyncio.Protocol, 1, 50000, buffer_size=size),
        )


# --- buffer size and local CID ------------------------------------------------------------------


class RecordingSocket:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, object]] = []

    def setsockopt(self, level: int, option: int, value: object) -> None:
        self.calls.append((level, option, value))


def test_buffer_maximum_is_raised_before_the_size() -> None:
    sock = RecordingSocket()
    vsock._set_buffer_size(cast(socket.socket, sock), 4 << 20)
    # The kernel clamps the size to the current maximum: the other order would leave 256 KiB.
    assert sock.calls == [
        (40, vsock.SO_VM_SOCKETS_BUFFER_MAX_SIZE, 4 << 20),
        (40, vsock.SO_VM_SOCKETS_BUFFER_SIZE, 4 << 20),
    ]


class FakeDevice:
    def __enter__(self) -> FakeDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def fileno(self) -> int:
        return 99


def test_local_cid_asks_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []

    def fake_ioctl(fd: int, request: int, arg: bytes) -> bytes:
        seen.append((fd, request))
        return struct.pack("=I", 16)

    monkeypatch.setattr(vsock, "open", lambda *a, **k: FakeDevice(), raising=False)
    monkeypatch.setattr(vsock.fcntl, "ioctl", fake_ioctl)
    assert vsock.local_cid() == 16
    assert seen == [(99, 0x7B9)]


def test_local_cid_without_the_device_raises_transport_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def absent(*args: object, **kwargs: object) -> FakeDevice:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/dev/vsock")

    monkeypatch.setattr(vsock, "open", absent, raising=False)
    with pytest.raises(TransportError, match="/dev/vsock") as info:
        vsock.local_cid()
    assert isinstance(info.value.__cause__, FileNotFoundError)


# --- the loop decision and the AF_UNIX route -----------------------------------------------------


@pytest.mark.parametrize(("loop_name", "expected"), [("asyncio", False), ("uvloop", True)])
def test_only_non_stdlib_loops_take_the_unix_route(loop_name: str, expected: bool) -> None:
    loop = LOOPS[loop_name]()
    try:
        assert vsock._needs_rewrap(loop) is expected
    finally:
        loop.close()


def test_rewrap_keeps_the_descriptor_and_takes_ownership() -> None:
    a, b = tcp_pair()
    with b:
        fd = a.fileno()
        wrapped = vsock._rewrap_as_unix(a)
        with wrapped:
            assert a.fileno() == -1  # detached: closing it cannot close the descriptor
            assert wrapped.fileno() == fd
            assert wrapped.family == socket.AF_UNIX
            assert wrapped.type == socket.SOCK_STREAM
            assert wrapped.getblocking() is False
            wrapped.settimeout(BOUND)
            b.sendall(b"same descriptor")
            assert wrapped.recv(64) == b"same descriptor"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_rewrapped_stream_carries_data_on_every_loop(loop_name: str) -> None:
    # The route uvloop takes for vsock, exercised on a loopback TCP descriptor: a non-Unix stream
    # presented as AF_UNIX is read and written as a plain byte stream.
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        a, b = tcp_pair()
        with b:
            transport, proto = await loop.create_unix_connection(
                lambda: Collect(10), sock=vsock._rewrap_as_unix(a)
            )
            try:
                b.sendall(b"0123456789")
                return await proto.done
            finally:
                transport.close()

    assert run(loop_name, main) == b"0123456789"


# --- connecting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_name", LOOPS)
def test_nonblocking_connect_completes_through_writer_readiness(loop_name: str) -> None:
    async def main() -> tuple[str, int]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with client:
                client.setblocking(False)
                await vsock._connect(asyncio.get_running_loop(), client, listener.getsockname())
                peer: tuple[str, int] = client.getpeername()
                return peer

    peer = run(loop_name, main)
    assert peer[0] == "127.0.0.1"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_nonblocking_connect_reports_refusal(loop_name: str) -> None:
    async def main() -> None:
        # A bound socket that does not listen: the kernel refuses connections to its port.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
            closed_port.bind(("127.0.0.1", 0))
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with client:
                client.setblocking(False)
                await vsock._connect(asyncio.get_running_loop(), client, closed_port.getsockname())

    with pytest.raises(OSError) as info:
        run(loop_name, main)
    assert info.value.errno == errno.ECONNREFUSED


@pytest.fixture
def unix_pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Stand-ins for a vsock socket: _new_socket hands out ``a``; ``b`` is its peer."""
    if not vsock.vsock_available():
        pytest.skip("this Python has no AF_VSOCK: the availability check comes first")
    a, b = socket.socketpair(socket.AF_UNIX)
    a.setblocking(False)
    monkeypatch.setattr(vsock, "_new_socket", lambda buffer_size: a)
    with a, b:
        yield a, b


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
    ],
    ids=["reset", "refused", "timeout"],
)
def test_connect_failures_become_connect_error_naming_the_address(
    monkeypatch: pytest.MonkeyPatch,
    unix_pair: tuple[socket.socket, socket.socket],
    loop_name: str,
    error: OSError,
) -> None:
    async def failing_connect(*args: object) -> None:
        raise error

    monkeypatch.setattr(vsock, "_connect", failing_connect)
    with pytest.raises(ConnectError, match=r"vsock://16:50001") as info:
        run(loop_name, lambda: vsock.create_vsock_connection(asyncio.Protocol, 16, 50001))
    assert info.value.__cause__ is error
    assert unix_pair[0].fileno() == -1  # the socket was closed, not leaked


@pytest.mark.parametrize("loop_name", LOOPS)
def test_connection_hands_the_connected_socket_to_the_loop(
    monkeypatch: pytest.MonkeyPatch,
    unix_pair: tuple[socket.socket, socket.socket],
    loop_name: str,
) -> None:
    connected: list[tuple[int, int]] = []

    async def fake_connect(loop: object, sock: socket.socket, addr: tuple[int, int]) -> None:
        connected.append(addr)

    monkeypatch.setattr(vsock, "_connect", fake_connect)
    _, peer = unix_pair

    async def main() -> bytes:
        transport, proto = await vsock.create_vsock_connection(
            lambda: Collect(5), vsock.VMADDR_CID_LOCAL, 50002
        )
        try:
            peer.sendall(b"hello")
            transport.write(b"back")
            return await proto.done
        finally:
            transport.close()

    assert run(loop_name, main) == b"hello"
    assert connected == [(1, 50002)]
    peer.settimeout(BOUND)
    assert peer.recv(16) == b"back"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_cancelled_connect_closes_its_socket(
    monkeypatch: pytest.MonkeyPatch,
    unix_pair: tuple[socket.socket, socket.socket],
    loop_name: str,
) -> None:
    async def never_connects(*args: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(vsock, "_connect", never_connects)

    async def main() -> None:
        task = asyncio.ensure_future(vsock.create_vsock_connection(asyncio.Protocol, 1, 50003))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop_name, main)
    assert unix_pair[0].fileno() == -1


# --- listening -----------------------------------------------------------------------------------


class UnbindableSocket:
    def __init__(self) -> None:
        self.closed = False

    def bind(self, address: tuple[int, int]) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    def close(self) -> None:
        self.closed = True


def test_bind_failure_becomes_transport_error_naming_the_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not vsock.vsock_available():
        pytest.skip("this Python has no AF_VSOCK: the availability check comes first")
    fake = UnbindableSocket()
    monkeypatch.setattr(vsock, "_new_socket", lambda buffer_size: fake)
    with pytest.raises(TransportError, match=r"vsock://4294967295:50004.*in use"):
        run("asyncio", lambda: vsock.create_vsock_server(asyncio.Protocol, 0xFFFFFFFF, 50004))
    assert fake.closed


# --- peer address --------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_name", LOOPS)
def test_peer_address_is_none_for_other_families(loop_name: str) -> None:
    async def main() -> tuple[int, int] | None:
        a, b = socket.socketpair(socket.AF_UNIX)
        with b:
            transport, _ = await asyncio.get_running_loop().create_unix_connection(
                asyncio.Protocol, sock=a
            )
            try:
                return vsock.peer_address(transport)
            finally:
                transport.close()

    assert run(loop_name, main) is None


def test_peer_address_is_none_without_a_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoSocket(asyncio.BaseTransport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    assert vsock.peer_address(NoSocket()) is None
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    assert vsock.peer_address(NoSocket()) is None
