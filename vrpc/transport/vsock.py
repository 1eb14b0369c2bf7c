"""AF_VSOCK streams for asyncio, under the stdlib event loop and under uvloop.

Theory of operation
-------------------
The stdlib event loop (every ``asyncio.BaseEventLoop``) takes an AF_VSOCK socket as it is: it sets
``TCP_NODELAY`` only on AF_INET/AF_INET6 sockets, so ``create_server(sock=...)`` and
``create_connection(sock=...)`` work unchanged.

uvloop does not. libuv sets ``TCP_NODELAY`` on every stream it accepts; vsock answers ENOPROTOOPT
and libuv closes the connection without a word, so a server built the usual way accepts and drops
every client while ``is_serving()`` stays true. ``create_connection(sock=vsock)`` fails with the
same errno and ``connect_accepted_socket`` refuses the family. The route that works is to present
the very same file descriptor as an AF_UNIX stream socket: libuv then treats it as a pipe, never
touches TCP options, and reads and writes the descriptor with plain ``read``/``write``, which vsock
supports. The kernel still sees a vsock socket; only Python's label of it changes.

Clients connect the vsock socket first (a non-blocking ``connect`` completed through writer
readiness, which every loop supports), then hand the connected descriptor to the loop.

Connecting to a port with no listener fails at once (ECONNRESET) rather than timing out, so callers
that wait for an enclave to boot retry with backoff; see ``ConnectError``.

The development and CI machines' own vsock belongs to their hypervisor: real vsock traffic runs only
inside the project's vsock lab VM (``scripts/vsock-lab``, ``make test-vsock``).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

import structlog

from vrpc.exceptions import ConnectError, TransportError

__all__ = [
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_CID_LOCAL",
    "VMADDR_PORT_ANY",
    "create_vsock_connection",
    "create_vsock_server",
    "local_cid",
    "peer_address",
    "vsock_available",
]

# linux/vm_sockets.h. Python 3.11 defines some of these only when built with AF_VSOCK and lacks
# VMADDR_CID_LOCAL altogether, so the project carries its own copies.
VMADDR_CID_ANY: int = 0xFFFFFFFF
VMADDR_CID_LOCAL: int = 1
VMADDR_CID_HOST: int = 2
VMADDR_PORT_ANY: int = 0xFFFFFFFF
IOCTL_VM_SOCKETS_GET_LOCAL_CID: int = 0x7B9
SO_VM_SOCKETS_BUFFER_SIZE: int = 0
SO_VM_SOCKETS_BUFFER_MAX_SIZE: int = 2
# The socket option level for vsock options is the address family itself.
_SOL_VSOCK: int = 40
_U32_MAX = 0xFFFFFFFF

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

_log = structlog.get_logger("vrpc.transport.vsock")


def vsock_available() -> bool:
    """Whether this Python can create AF_VSOCK sockets at all (opens no socket)."""
    return hasattr(socket, "AF_VSOCK")


def _require_vsock() -> int:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        # Some standalone Python builds are compiled without vsock support: say so plainly rather
        # than fail later with an AttributeError deep inside the loop.
        raise TransportError(
            "this Python has no AF_VSOCK support (socket.AF_VSOCK is missing); "
            "use a CPython built with Linux vsock headers"
        )
    return int(family)


def local_cid() -> int:
    """This machine's context id, as the vsock driver reports it (IOCTL_VM_SOCKETS_GET_LOCAL_CID).

    Returns ``VMADDR_CID_ANY`` when no guest-to-host transport is loaded.
    """
    try:
        with open("/dev/vsock", "rb", buffering=0) as dev:
            buf = fcntl.ioctl(dev.fileno(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0\0\0\0")
    except OSError as exc:
        raise TransportError(f"cannot read the local vsock CID from /dev/vsock: {exc}") from exc
    (cid,) = struct.unpack("=I", buf)
    return int(cid)


def _check_address(cid: int, port: int) -> None:
    for name, value in (("cid", cid), ("port", port)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32_MAX:
            raise ValueError(f"vsock {name} must be an integer in 0..{_U32_MAX}, got {value!r}")


def _uri(cid: int, port: int) -> str:
    return f"vsock://{cid}:{port}"


def _set_buffer_size(sock: socket.socket, size: int) -> None:
    # The kernel clamps the buffer size to the maximum, so the maximum goes first. Both options are
    # u64s; CPython passes an int as 8 bytes for AF_VSOCK sockets, which is what the kernel wants.
    sock.setsockopt(_SOL_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, size)
    sock.setsockopt(_SOL_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, size)


def _check_buffer_size(buffer_size: int | None) -> None:
    if buffer_size is not None and (
        isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size <= 0
    ):
        raise ValueError(f"buffer_size must be a positive integer, got {buffer_size!r}")


def _check_call(cid: int, port: int, buffer_size: int | None) -> None:
    # Everything that can be refused is refused before a socket exists.
    _require_vsock()
    _check_address(cid, port)
    _check_buffer_size(buffer_size)


def _new_socket(buffer_size: int | None) -> socket.socket:
    try:
        # EAFNOSUPPORT here means the kernel has no vsock driver loaded.
        sock = socket.socket(_require_vsock(), socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(f"cannot create a vsock socket: {exc.strerror or exc}") from exc
    try:
        sock.setblocking(False)
        if buffer_size is not None:
            _set_buffer_size(sock, buffer_size)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot set the vsock buffer size: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _needs_rewrap(loop: asyncio.AbstractEventLoop) -> bool:
    # Every stdlib loop derives from BaseEventLoop and applies TCP options to INET sockets only.
    # Anything else (uvloop, or another libuv-style loop) gets the AF_UNIX presentation, which is
    # safe for any loop that can serve Unix sockets.
    return not isinstance(loop, asyncio.BaseEventLoop)


def _rewrap_as_unix(sock: socket.socket) -> socket.socket:
    """Present ``sock``'s descriptor as an AF_UNIX stream socket; ``sock`` gives up ownership."""
    fd = sock.detach()
    try:
        wrapped = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    wrapped.setblocking(False)
    return wrapped


async def create_vsock_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    cid: int,
    port: int,
    *,
    backlog: int = 128,
    buffer_size: int | None = None,
) -> asyncio.Server:
    """Listen on ``vsock://cid:port`` and serve each connection with a new protocol.

    ``cid`` is usually ``VMADDR_CID_ANY``. ``buffer_size`` sets the vsock receive buffer (bytes);
    accepted connections inherit it. Raises ``TransportError`` when the address cannot be bound.
    """
    _check_call(cid, port, buffer_size)
    loop = asyncio.get_running_loop()
    sock = _new_socket(buffer_size)
    try:
        sock.bind((cid, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {_uri(cid, port)}: {exc.strerror or exc}") from exc
    rewrap = _needs_rewrap(loop)
    if rewrap:
        sock = _rewrap_as_unix(sock)
    try:
        server = await loop.create_server(protocol_factory, sock=sock, backlog=backlog)
    except BaseException:
        sock.close()
        raise
    _log.debug("vsock.listening", cid=cid, port=port, unix_route=rewrap)
    return server


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple[int, int]
) -> None:
    """Non-blocking connect completed by writer readiness (works on every loop with add_writer)."""
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        done: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def writable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_writer(fd, writable)
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err not in (0, errno.EISCONN):
        raise OSError(err, os.strerror(err))


async def create_vsock_connection(
    protocol_factory: Callable[[], _P],
    cid: int,
    port: int,
    *,
    buffer_size: int | None = None,
) -> tuple[asyncio.Transport, _P]:
    """Connect to ``vsock://cid:port`` and attach a new protocol to the connection.

    Raises ``ConnectError`` (naming the address) when the peer refuses or resets the connection,
    which is what vsock does at once when nothing listens on the port yet.
    """
    _check_call(cid, port, buffer_size)
    loop = asyncio.get_running_loop()
    sock = _new_socket(buffer_size)
    try:
        try:
            await _connect(loop, sock, (cid, port))
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {_uri(cid, port)}: {exc.strerror or exc}"
            ) from exc
        if _needs_rewrap(loop):
            sock = _rewrap_as_unix(sock)
            transport, protocol = await loop.create_unix_connection(protocol_factory, sock=sock)
        else:
            transport, protocol = await loop.create_connection(protocol_factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport, protocol


def peer_address(transport: asyncio.BaseTransport) -> tuple[int, int] | None:
    """The peer's ``(cid, port)`` of a vsock transport, or ``None`` when it is not vsock.

    The transport's own ``peername`` cannot be trusted for this: on the AF_UNIX route the loop
    decodes the vsock address as a Unix path. Asking the kernel about the descriptor itself gives
    the real address on every loop.
    """
    family = getattr(socket, "AF_VSOCK", None)
    sock = transport.get_extra_info("socket")
    if family is None or sock is None:
        return None
    try:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return None
    with dup:
        if dup.family != family:
            return None
        try:
            cid, port = dup.getpeername()
        except OSError:
            return None
    return int(cid), int(port)
