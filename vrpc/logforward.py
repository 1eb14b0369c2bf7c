"""Enclave logs to the parent: a structlog processor that serves each event as one JSON line.

A production enclave has no console anyone can read, so its log events would be lost. The
enclave listens on a stream address (``vsock://ANY:5001`` in an enclave, ``unix:///...`` in
tests) and writes every log event, as one JSON object per line, to the one reader connected
there: ``vrpc enclave run`` on the parent, which knows the enclave's CID and connects to it.

The enclave listens and the parent connects (not the other way round) because the parent may
run several enclaves of one image: each is reached at its own CID on the same port, where a
parent-side listening port would have to differ per enclave and so per image.

What leaves: the parent, and any process on it that connects first, reads these lines in
clear, so they must carry nothing secret. vrpc's own events never carry keys, secrets, payloads
or attestation documents (docs/security.md, "Log hygiene"); on top of that, every forwarded
event is passed through :func:`redact`, which keeps only JSON scalars, writes byte strings as
their length, replaces the values of secret-sounding keys, and bounds every string. The parent
can also drop or invent lines: forwarded logs are for operating the service, not evidence.

Logging never waits for the parent: lines queue in a bounded buffer (the oldest are dropped
when it is full, and a ``log lines dropped`` event says how many) and are written when a reader
is connected and keeping up. A new connection replaces the previous reader.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import threading
import typing
from collections.abc import Mapping, MutableMapping
from typing import Any

from vrpc.transport import Listener, create_server

__all__ = [
    "MAX_LINE",
    "MAX_STRING",
    "SECRET_KEY_PARTS",
    "LogForwarder",
    "encode_line",
    "redact",
]

#: Longest string value forwarded, in characters (a traceback fits; a dumped payload does not).
MAX_STRING = 8192
#: Longest forwarded line, in bytes; a longer event is replaced by a note naming its event.
MAX_LINE = 65536
#: A key containing any of these (case-insensitive) has its value replaced by ``<redacted>``.
SECRET_KEY_PARTS = (
    "secret",
    "password",
    "passphrase",
    "token",
    "private",
    "plaintext",
    "material",
    "payload",
    "credential",
    "signature",
)
_MAX_DEPTH = 4
_MAX_ITEMS = 64
_BATCH = 256
#: Lines kept while no reader is connected (or it lags behind).
DEFAULT_MAX_BUFFERED = 10_000


def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)


def _clean(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "...[truncated]"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"  # never the contents, in any encoding
    if isinstance(value, enum.Enum):
        return value.name
    if depth >= _MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return {
            str(k): "<redacted>" if _secret_key(str(k)) else _clean(v, depth + 1)
            for k, v in list(value.items())[:_MAX_ITEMS]
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in list(value)[:_MAX_ITEMS]]
    # Anything else (a key object, an exception, a request) could print what it holds: only its
    # type is forwarded. Log str(exc) or a name explicitly to forward it.
    return f"<{type(value).__name__}>"


def redact(event: Mapping[str, Any]) -> dict[str, Any]:
    """The forwardable form of a structlog event dict (a new dict; ``event`` is not changed)."""
    cleaned = _clean(event, 0)
    assert isinstance(cleaned, dict)
    return cleaned


def encode_line(event: Mapping[str, Any]) -> bytes:
    """One redacted event as a JSON line (ASCII, so no control character reaches a terminal)."""
    line = json.dumps(redact(event), ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        note = {"event": "log line too long", "original_event": str(event.get("event"))[:200]}
        line = json.dumps(redact(note), ensure_ascii=True).encode() + b"\n"
    return line


class _Reader(asyncio.Protocol):
    def __init__(self, forwarder: LogForwarder) -> None:
        self._forwarder = forwarder
        self.transport: asyncio.WriteTransport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A WriteTransport by protocol, not by class: uvloop's transports do not subclass it.
        self.transport = typing.cast(asyncio.WriteTransport, transport)
        self._forwarder._attach(self)

    def data_received(self, data: bytes) -> None:
        pass  # the reader has nothing to say; whatever it sends is ignored

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._forwarder._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forwarder._detach(self)


class LogForwarder:
    """A structlog processor that also serves every event to a reader at ``listen``.

    Put it in the processor chain after the timestamp, level and exception formatting and
    before the renderer (it returns the event unchanged), then ``await start()`` in the event
    loop. Events logged before ``start`` (or while no reader is connected) are buffered, at most
    ``max_buffered`` lines. Events may be logged from any thread.
    """

    def __init__(self, listen: str, *, max_buffered: int = DEFAULT_MAX_BUFFERED) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self.listen = listen
        self._lines: collections.deque[bytes] = collections.deque(maxlen=max_buffered)
        self._lock = threading.Lock()
        self.dropped = 0  # lines lost to a full buffer, since the last report
        self._reader: _Reader | None = None
        self._listener: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._flush_scheduled = False

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        try:
            line = encode_line(event_dict)
        except Exception:  # a log call must never fail because of forwarding
            line = encode_line({"event": "log event not forwardable"})
        with self._lock:
            if len(self._lines) == self._lines.maxlen:
                self.dropped += 1
            self._lines.append(line)
        self._wake()
        return event_dict

    def _wake(self) -> None:
        loop = self._loop
        if loop is None or self._flush_scheduled or loop.is_closed():
            return
        self._flush_scheduled = True
        if threading.get_ident() == self._thread:
            loop.call_soon(self._flush)
        else:
            try:
                loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop closed meanwhile: the lines stay buffered
                self._flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        reader = self._reader
        if reader is None or reader.transport is None or reader.transport.is_closing():
            return
        with self._lock:
            if reader.paused:
                return
            # A batch at a time: the transport's buffer stays near its high-water mark, and
            # the bounded deque (not the transport) holds what the reader has not taken yet.
            lines = [self._lines.popleft() for _ in range(min(_BATCH, len(self._lines)))]
            more = bool(self._lines)
            dropped, self.dropped = self.dropped, 0
        if dropped:
            lines.insert(0, encode_line({"event": "log lines dropped", "count": dropped}))
        reader.transport.writelines(lines)
        if more and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _attach(self, reader: _Reader) -> None:
        previous, self._reader = self._reader, reader
        if previous is not None and previous.transport is not None:
            previous.transport.close()  # one reader at a time: the newest
        self._flush()

    def _detach(self, reader: _Reader) -> None:
        if self._reader is reader:
            self._reader = None

    async def start(self) -> None:
        """Listen for the reader; buffered lines go to it as soon as it connects."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._listener = await create_server(self.listen, lambda: _Reader(self), backlog=4)

    async def close(self) -> None:
        """Stop listening and disconnect the reader (lines still buffered are kept)."""
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        reader, self._reader = self._reader, None
        if reader is not None and reader.transport is not None:
            reader.transport.close()
        self._loop = None
