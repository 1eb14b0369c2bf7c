"""``Channel``: what typed stubs call through. ``Client`` (one server) and ``Pool`` (several)
both implement it, so a stub, an interceptor or a test double works with either."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

from vrpc.service import Service

__all__ = ["Channel"]

T = TypeVar("T", bound=Service)


class Channel(Protocol):
    async def call(
        self,
        method: str,
        args: list[Any],
        *,
        idempotent: bool = False,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        convert: Callable[[Any], Any] | None = None,
    ) -> Any:
        """One unary call of ``service.method`` with positional ``args``; its decoded result,
        passed through ``convert`` if given."""
        ...

    def stream(
        self,
        method: str,
        args: list[Any],
        *,
        request: AsyncIterable[Any] | None = None,
        stream_response: bool = True,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        convert: Callable[[Any], Any] = ...,
    ) -> AsyncIterator[Any]:
        """A streaming call: the response items (or, for client streaming, the one result)."""
        ...

    def stub(self, interface: type[T]) -> T:
        """An object typed as ``interface`` whose methods call through this channel."""
        ...
