"""A client pool over several endpoints (for example the up to four enclaves of one parent).

Calls go to the healthy endpoint with the fewest calls outstanding; an endpoint that fails to
connect or answers UNAVAILABLE is marked unhealthy until a background health check
(``vrpc.health.check``) succeeds again. Idempotent calls that fail with UNAVAILABLE move to
another endpoint, so a draining or restarting enclave does not fail them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import structlog

from vrpc.client import Client
from vrpc.exceptions import RpcError
from vrpc.service import Service
from vrpc.status import Status

__all__ = ["Pool"]

log = structlog.get_logger("vrpc.pool")
T = TypeVar("T", bound=Service)


class _Endpoint:
    __slots__ = ("client", "healthy", "outstanding")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.outstanding = 0
        self.healthy = True


class Pool:
    def __init__(
        self, uris: Sequence[str], *, health_interval: float = 2.0, **client_options: Any
    ) -> None:
        if not uris:
            raise ValueError("a pool needs at least one endpoint")
        client_options.setdefault("retries", 0)  # the pool retries across endpoints itself
        client_options.setdefault("connect_timeout", 1.0)
        self.endpoints = [_Endpoint(Client(uri, **client_options)) for uri in uris]
        self.health_interval = health_interval
        self._health_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Pool:
        await asyncio.gather(*(self._probe(e) for e in self.endpoints))
        if not any(e.healthy for e in self.endpoints):
            raise RpcError(Status.UNAVAILABLE, "no endpoint of the pool is reachable")
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(e.client.close() for e in self.endpoints))

    async def _probe(self, endpoint: _Endpoint) -> None:
        try:
            status = await endpoint.client.call("vrpc.health.check", [""], timeout=2.0)
            healthy = status == "SERVING"
        except Exception as exc:  # attestation failures included: never route to that endpoint
            log.info("endpoint unhealthy", address=endpoint.client.uri, reason=str(exc))
            healthy = False
        endpoint.healthy = healthy

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await asyncio.gather(*(self._probe(e) for e in self.endpoints))

    def _pick(self, exclude: set[_Endpoint]) -> _Endpoint:
        candidates = [e for e in self.endpoints if e.healthy and e not in exclude]
        if not candidates:
            raise RpcError(Status.UNAVAILABLE, "no healthy endpoint in the pool")
        return min(candidates, key=lambda e: e.outstanding)

    async def call(
        self,
        method: str,
        args: list[Any],
        *,
        idempotent: bool = False,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        tried: set[_Endpoint] = set()
        while True:
            endpoint = self._pick(tried)
            tried.add(endpoint)
            endpoint.outstanding += 1
            try:
                return await endpoint.client.call(
                    method, args, idempotent=False, timeout=timeout, metadata=metadata
                )
            except RpcError as exc:
                if exc.status is not Status.UNAVAILABLE:
                    raise
                endpoint.healthy = False
                if not idempotent or len(tried) >= len(self.endpoints):
                    raise
                log.info("moving idempotent call", method=method, away_from=endpoint.client.uri)
            finally:
                endpoint.outstanding -= 1

    async def stream(self, method: str, args: list[Any], **kwargs: Any) -> AsyncIterator[Any]:
        endpoint = self._pick(set())
        endpoint.outstanding += 1
        try:
            async for item in endpoint.client.stream(method, args, **kwargs):
                yield item
        finally:
            endpoint.outstanding -= 1

    def stub(self, interface: type[T]) -> T:
        from vrpc.stub import make_stub

        return make_stub(self, interface)
