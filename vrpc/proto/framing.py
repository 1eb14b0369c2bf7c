"""Length-prefixed frames: ``length(4, big-endian) || body``.

This is the framing of the message stream (the plaintext inside the session layer). The length
prefix is checked against ``max_frame_size`` *before* anything is buffered beyond the bytes
already received, so a hostile prefix of 4 GiB costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from vrpc.exceptions import FrameTooLarge

__all__ = ["HEADER_SIZE", "FrameDecoder", "encode_frame"]

HEADER_SIZE = 4
_MAX_PREFIX = 0xFFFFFFFF


def encode_frame(body: bytes) -> bytes:
    """One frame as bytes (prefix and body in one buffer)."""
    if len(body) > _MAX_PREFIX:
        raise ValueError("frame body longer than 2**32 - 1 bytes")
    return len(body).to_bytes(4, "big") + body


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    ``feed`` returns the complete frame bodies found so far; a partial frame stays buffered.
    The buffered amount never exceeds ``max_frame_size + HEADER_SIZE`` plus what one ``feed``
    call delivered, because an over-long prefix raises as soon as its four bytes are seen.
    """

    __slots__ = ("_buf", "frames", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        # Complete frames so far: a caller tells a partial frame that is new from one that has
        # been waiting (the slow-body deadline) by whether this moved.
        self.frames = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        return [bytes(view) for view in self.views(data)]

    def views(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Like ``feed`` but yields each body as a view into the buffer, valid only until the
        next item is requested (it is released then): a consumer that decodes in place saves a
        copy of every message (a megabyte for a 1 MiB payload). Run the generator to its end."""
        buf = self._buf
        # A bytearray is read in place too: the views are released before this returns, and
        # only a trailing partial frame is copied.
        direct = not buf and type(data) in (bytes, bytearray)
        if direct:
            # Nothing pending: read the frames straight out of the received chunk and keep
            # only a trailing partial frame.
            view = memoryview(data)
        else:
            buf += data
            view = memoryview(buf)
        end = len(view)
        pos = 0
        limit = self.max_frame_size
        try:
            while end - pos >= HEADER_SIZE:
                size = int.from_bytes(view[pos : pos + HEADER_SIZE], "big")
                if size > limit:
                    raise FrameTooLarge(
                        f"frame of {size} bytes exceeds the maximum of {limit} bytes"
                    )
                stop = pos + HEADER_SIZE + size
                if stop > end:
                    break
                body = view[pos + HEADER_SIZE : stop]
                try:
                    yield body
                finally:
                    body.release()
                pos = stop
                self.frames += 1
        finally:
            view.release()
        if direct:
            if pos < end:
                buf += data[pos:]
        elif pos:
            del buf[:pos]
