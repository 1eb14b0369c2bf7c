"""Per-call context: what a handler can know about its call, and per-call options for callers.

Handlers read ``vrpc.current_call()`` (method, metadata, peer claims, remaining time) and may
send headers or set trailers. Callers wrap calls in
``with vrpc.call_options(timeout=..., metadata=...)``; the options object then holds the headers
and trailers the handler sent back.

A call made *inside* a handler inherits the handler's remaining deadline, so a chain of enclave
calls never outlives the original caller's patience.
"""

from __future__ import annotations

import contextvars
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec

__all__ = ["CallContext", "CallOptions", "Peer", "call_options", "current_call"]


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection."""

    address: str
    claims: Any = None  # vrpc.attestation.Claims of an attested peer (mutual attestation)
    mode: str = ""
    # A 48-byte value unique to this session and equal on both ends (b"" in plaintext mode):
    # bind application tokens to the attested session with it (docs/guide.md, channel binding).
    channel_binding: bytes = b""


class CallContext(msgspec.Struct, eq=False):
    """The server-side view of one call (``vrpc.current_call()`` inside a handler).

    ``deadline`` is a ``time.monotonic()`` value, or None. A Struct: one is built per call, in C.
    Compared and hashed by identity (one context per call, usable as a key), and its repr names
    no field: metadata may carry credentials, and a context may end up in a log line.
    """

    method: str
    metadata: dict[str, Any]
    peer: Peer
    deadline: float | None
    # The connection shell that sends this call's headers; kept as (object, id) rather than a
    # bound partial because a context is built for every call.
    _sender: Any
    _call_id: int
    trailers: dict[str, Any] = msgspec.field(default_factory=dict)
    headers_sent: bool = False

    def __repr__(self) -> str:
        return object.__repr__(self)

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def send_headers(self, metadata: dict[str, Any]) -> None:
        """Send initial metadata to the caller before the result (at most once)."""
        if self.headers_sent:
            raise RuntimeError("headers were already sent for this call")
        self.headers_sent = True
        self._sender.send_headers(self._call_id, metadata)

    def set_trailer(self, key: str, value: Any) -> None:
        self.trailers[key] = value


_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar("vrpc_call")


def current_call() -> CallContext:
    """The context of the call being handled; LookupError outside a handler."""
    return _current.get()


@dataclasses.dataclass(slots=True)
class CallOptions:
    """Options for the calls made inside ``with call_options(...)``, and what came back."""

    timeout: float | None = None
    metadata: dict[str, Any] | None = None
    headers: dict[str, Any] = dataclasses.field(default_factory=dict)
    trailers: dict[str, Any] = dataclasses.field(default_factory=dict)


_options: contextvars.ContextVar[CallOptions | None] = contextvars.ContextVar(
    "vrpc_call_options", default=None
)


@contextmanager
def call_options(
    *, timeout: float | None = None, metadata: dict[str, Any] | None = None
) -> Iterator[CallOptions]:
    """Set a timeout and metadata for the calls made in the block; read headers/trailers after."""
    options = CallOptions(timeout=timeout, metadata=metadata)
    token = _options.set(options)
    try:
        yield options
    finally:
        _options.reset(token)
