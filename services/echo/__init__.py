"""A minimal service used by the demo and the benchmarks: it returns what it is given.

The interface (``Echo``) has no enclave-only dependency, so hosts import it to build stubs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from vrpc import Service, rpc

__all__ = ["Echo", "EchoImpl"]


class Echo(Service, name="echo.v1"):
    @rpc(idempotent=True)
    async def echo(self, data: bytes) -> bytes:
        """Return ``data`` unchanged."""
        raise NotImplementedError

    @rpc
    def stream(self, size: int, count: int) -> AsyncIterator[bytes]:
        """Yield ``count`` items of ``size`` bytes each."""
        raise NotImplementedError

    @rpc
    async def sink(self, items: AsyncIterator[bytes]) -> int:
        """Consume a stream; return the number of bytes received."""
        raise NotImplementedError


class EchoImpl(Echo):
    async def echo(self, data: bytes) -> bytes:
        return data

    async def stream(self, size: int, count: int) -> AsyncIterator[bytes]:
        item = b"\x5a" * size
        for _ in range(count):
            yield item

    async def sink(self, items: AsyncIterator[bytes]) -> int:
        total = 0
        async for item in items:
            total += len(item)
        return total
