"""The floor: blocking sockets, ``recv_into`` a preallocated buffer, one call in flight.

No event loop, no futures, no codec: what one round trip costs in CPython over a Unix socket.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from benchmarks._base import HEADER, KIND_ECHO, MAX_MESSAGE

_HLEN = HEADER.size


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    want = len(view)
    while got < want:
        n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def serve_forever(path: str, on_listening: Callable[[], None]) -> None:
    """Serve one connection at a time until the process is terminated."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    on_listening()
    buf = bytearray(_HLEN + MAX_MESSAGE)
    view = memoryview(buf)
    while True:
        conn, _ = listener.accept()
        with conn:
            while _recv_exactly(conn, view[:_HLEN]):
                _, size = HEADER.unpack_from(buf, 0)
                if size > MAX_MESSAGE or not _recv_exactly(conn, view[_HLEN : _HLEN + size]):
                    break
                conn.sendall(view[: _HLEN + size])


class BlockingClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray(_HLEN + MAX_MESSAGE)
        self.view = memoryview(self.buf)

    def echo(self, payload: bytes) -> memoryview:
        sock = self.sock
        sock.sendall(HEADER.pack(KIND_ECHO, len(payload)) + payload)
        view = self.view
        if not _recv_exactly(sock, view[:_HLEN]):
            raise ConnectionError("connection lost")
        _, size = HEADER.unpack_from(self.buf, 0)
        if not _recv_exactly(sock, view[_HLEN : _HLEN + size]):
            raise ConnectionError("connection lost")
        return view[_HLEN : _HLEN + size]

    def close(self) -> None:
        self.sock.close()
