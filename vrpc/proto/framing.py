"""Length-prefixed frames: ``length(4, big-endian) || body``.

This is the framing of the message stream (the plaintext inside the session layer). The length
prefix is checked against ``max_frame_size`` *before* anything is buffered beyond the bytes
already received, so a hostile prefix of 4 GiB costs nothing.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator

from vrpc.exceptions import FrameTooLarge

__all__ = ["HEADER_SIZE", "FrameDecoder", "encode_frame", "unheld"]

# The length prefix, read and written in place (no slice or bytes object per frame).
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
_MAX_PREFIX = 0xFFFFFFFF
# A partial frame at least this large is assembled in a buffer of its own size (see FrameDecoder).
_ASSEMBLE_FROM = 65536
_refs = sys.getrefcount


def unheld(buf: bytearray, owned: int) -> bool:
    """Nothing but its owner holds ``buf``, so it may be written again: no buffer export is
    alive (a memoryview, a transport's pending write) and ``sys.getrefcount`` sees no more than
    the owner's ``owned`` references (its container and the caller's variable) plus this call's
    own two. The export check does not depend on how an interpreter counts references held by
    local variables."""
    if _refs(buf) > owned + 2:
        return False
    try:
        last = buf.pop()  # any resize fails while an export is alive
    except BufferError:
        return False
    buf.append(last)  # within the allocation: no copy
    return True


def encode_frame(body: bytes) -> bytes:
    """One frame as bytes (prefix and body in one buffer)."""
    if len(body) > _MAX_PREFIX:
        raise ValueError("frame body longer than 2**32 - 1 bytes")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    ``feed`` returns the complete frame bodies found so far; a partial frame stays buffered.
    The buffered amount never exceeds ``max_frame_size + HEADER_SIZE`` plus what one ``feed``
    call delivered, because an over-long prefix raises as soon as its four bytes are seen.

    A large frame that arrives over several chunks is assembled in one buffer of exactly its
    size (not grown chunk by chunk), and that buffer is kept for the next large frame when
    nothing references it any more: a fresh megabyte costs ~256 page faults when written.
    """

    __slots__ = ("_asm", "_asm_fill", "_asm_size", "_buf", "frames", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        # Complete frames so far: a caller tells a partial frame that is new from one that has
        # been waiting (the slow-body deadline) by whether this moved.
        self.frames = 0
        # The assembly buffer (kept between large frames), the body size being assembled
        # (0: none) and how much of it has arrived.
        self._asm: bytearray | None = None
        self._asm_size = 0
        self._asm_fill = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) + (HEADER_SIZE + self._asm_fill if self._asm_size else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        return [bytes(view) for view in self.views(data)]

    def _assemble(self, size: int, part: memoryview) -> None:
        """Start assembling a body of ``size`` bytes whose first bytes are ``part``."""
        asm = self._asm
        # Owned through the attribute and ``asm``; any other holder (or a live view) keeps an
        # earlier body, which must not be written over.
        if asm is None or len(asm) < size or not unheld(asm, 2):
            asm = self._asm = bytearray(size)
        fill = len(part)
        asm[:fill] = part
        self._asm_size = size
        self._asm_fill = fill

    def views(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Like ``feed`` but yields each body as a view into the buffer, valid only until the
        next item is requested (it is released then): a consumer that decodes in place saves a
        copy of every message (a megabyte for a 1 MiB payload). Run the generator to its end."""
        if self._asm_size:
            # A large frame is being assembled: copy what it still needs straight into place.
            size = self._asm_size
            fill = self._asm_fill
            asm = self._asm
            assert asm is not None
            with memoryview(data) as src:
                take = min(size - fill, len(src))
                asm[fill : fill + take] = src[:take]
                fill += take
                if fill < size:
                    self._asm_fill = fill
                    return
                self._asm_size = self._asm_fill = 0
                self.frames += 1
                body = memoryview(asm)[:size]
                try:
                    yield body
                finally:
                    body.release()
                if take == len(src):
                    return
                data = src[take:]
            # ``data`` is now a view of the rest (its own export of the caller's buffer).
        buf = self._buf
        # A bytes, bytearray or memoryview chunk is read in place: the views are released
        # before this returns, and only a trailing partial frame is copied.
        direct = not buf
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
        unpack_header = HEADER.unpack_from
        try:
            while end - pos >= HEADER_SIZE:
                size = unpack_header(view, pos)[0]
                if size > limit:
                    raise FrameTooLarge(
                        f"frame of {size} bytes exceeds the maximum of {limit} bytes"
                    )
                stop = pos + HEADER_SIZE + size
                if stop > end:
                    if size >= _ASSEMBLE_FROM:
                        self._assemble(size, view[pos + HEADER_SIZE : end])
                        pos = end
                    break
                body = view[pos + HEADER_SIZE : stop]
                try:
                    yield body
                finally:
                    body.release()
                pos = stop
                self.frames += 1
            if direct and pos < end:
                buf += view[pos:]
        finally:
            view.release()
        if not direct and pos:
            del buf[:pos]
