"""A client pool over several endpoints (for example the up to four enclaves of one parent).

Calls go to the healthy connection with the fewest calls outstanding, preferring connections
with a free call slot under their server's announced limit, so a saturated connection is routed
around instead of queued on. ``connections_per_endpoint`` (default 1, at most
``MAX_CONNECTIONS_PER_ENDPOINT``) opens several attested connections to each endpoint, so one
host process can keep an enclave busy beyond one connection's call limit.

An endpoint that fails to connect, refuses at its connection limit or answers UNAVAILABLE is
marked unhealthy until a background health check (``vrpc.health.check``) succeeds again.
Idempotent calls that fail with UNAVAILABLE move to another endpoint (``vrpc._retry``), so a
draining or restarting enclave does not fail them; a non-idempotent call fails with UNAVAILABLE
only if it was in flight on the server that went away. A stream moves to another endpoint when no
server started it (nothing was delivered, and its request is not a stream of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import structlog

from vrpc._retry import retrying
from vrpc.client import Client
from vrpc.exceptions import RpcError
from vrpc.proto.connection import UNPROCESSED, is_unprocessed
from vrpc.service import Service
from vrpc.status import Status
from vrpc.stub import make_stub

__all__ = ["MAX_CONNECTIONS_PER_ENDPOINT", "Pool"]

log = structlog.get_logger("vrpc.pool")
T = TypeVar("T", bound=Service)

MAX_CONNECTIONS_PER_ENDPOINT = 16
PROBE_TIMEOUT = 2.0  # seconds a health check may take before its endpoint counts as unhealthy


class _Endpoint:
    __slots__ = ("clients", "healthy", "outstanding", "uri")

    def __init__(self, uri: str, clients: list[Client]) -> None:
        self.uri = uri
        self.clients = clients
        self.outstanding = 0
        self.healthy = True

    def pick(self) -> Client:
        """The connection with the most room: unsaturated first, then the fewest calls in
        flight or queued (calls queued behind a full connection count, or every call issued
        while all are full would queue on the same one)."""
        return min(self.clients, key=lambda c: (c.saturated, c.calls_in_flight + c.calls_queued))

    @property
    def saturated(self) -> bool:
        return all(c.saturated for c in self.clients)


class Pool:
    def __init__(
        self,
        uris: Sequence[str],
        *,
        health_interval: float = 2.0,
        connections_per_endpoint: int = 1,
        **client_options: Any,
    ) -> None:
        if not uris:
            raise ValueError("a pool needs at least one endpoint")
        if not 1 <= connections_per_endpoint <= MAX_CONNECTIONS_PER_ENDPOINT:
            raise ValueError(
                f"connections_per_endpoint must be in 1..{MAX_CONNECTIONS_PER_ENDPOINT}"
            )
        client_options.setdefault("retries", 0)  # the pool retries across endpoints itself
        client_options.setdefault("connect_timeout", 1.0)
        self.endpoints = [
            _Endpoint(uri, [Client(uri, **client_options) for _ in range(connections_per_endpoint)])
            for uri in uris
        ]
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
        await asyncio.gather(*(c.close() for e in self.endpoints for c in e.clients))

    async def _probe(self, endpoint: _Endpoint) -> None:
        if endpoint.healthy and endpoint.saturated:
            # Every connection is full and calls wait behind them: the endpoint is serving. A
            # probe would wait in the same queue and could time out there, taking a busy
            # endpoint for a dead one; a dead connection fails its calls, which marks it.
            return
        try:
            statuses = await asyncio.gather(
                *(
                    c.call("vrpc.health.check", [""], timeout=PROBE_TIMEOUT)
                    for c in endpoint.clients
                )
            )
            healthy = all(status == "SERVING" for status in statuses)
        except Exception as exc:  # attestation failures included: never route to that endpoint
            log.info("endpoint unhealthy", address=endpoint.uri, reason=str(exc))
            healthy = False
        endpoint.healthy = healthy

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await asyncio.gather(*(self._probe(e) for e in self.endpoints))

    def _pick(self, exclude: set[_Endpoint]) -> _Endpoint:
        candidates = [e for e in self.endpoints if e.healthy and e not in exclude]
        if not candidates:
            candidates = [e for e in self.endpoints if e.healthy]
        if not candidates:
            # Nothing was sent: the caller may try again later, whatever the call.
            raise RpcError(Status.UNAVAILABLE, "no healthy endpoint in the pool", UNPROCESSED)
        return min(candidates, key=lambda e: (e.saturated, e.outstanding))

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
        tried: set[_Endpoint] = set()

        async def attempt(_: int) -> Any:
            endpoint = self._pick(tried)
            tried.add(endpoint)
            endpoint.outstanding += 1
            try:
                return await endpoint.pick().call(
                    method,
                    args,
                    idempotent=False,
                    timeout=timeout,
                    metadata=metadata,
                    convert=convert,
                )
            except RpcError as exc:
                if exc.status is Status.UNAVAILABLE:
                    endpoint.healthy = False
                    log.info("endpoint unavailable", address=endpoint.uri, reason=exc.message)
                raise
            finally:
                endpoint.outstanding -= 1

        # Any call may move when it never reached a server (no connection, a server at its
        # limit); only an idempotent one when it may have run where it failed.
        return await retrying(
            attempt,
            attempts=len(self.endpoints),
            deadline=None,
            retry_on=lambda exc: (
                is_unprocessed(exc.details) or (idempotent and exc.status is Status.UNAVAILABLE)
            ),
            what=method,
        )

    async def stream(
        self,
        method: str,
        args: list[Any],
        *,
        request: AsyncIterable[Any] | None = None,
        stream_response: bool = True,
        timeout: float | None = None,
        metadata: dict[str, Any] | None = None,
        convert: Callable[[Any], Any] = lambda x: x,
    ) -> AsyncIterator[Any]:
        tried: set[_Endpoint] = set()
        for attempt in range(len(self.endpoints)):
            endpoint = self._pick(tried)
            tried.add(endpoint)
            endpoint.outstanding += 1
            delivered = False
            try:
                async for item in endpoint.pick().stream(
                    method,
                    args,
                    request=request,
                    stream_response=stream_response,
                    timeout=timeout,
                    metadata=metadata,
                    convert=convert,
                ):
                    delivered = True
                    yield item
                return
            except RpcError as exc:
                if exc.status is Status.UNAVAILABLE:
                    endpoint.healthy = False
                    log.info("endpoint unavailable", address=endpoint.uri, reason=exc.message)
                # A stream moves only when no server started it and nothing of it was used: no
                # item reached the caller, and no request items were taken from an iterator that
                # cannot be replayed.
                movable = not delivered and request is None and is_unprocessed(exc.details)
                if not movable or attempt == len(self.endpoints) - 1:
                    raise
                log.info("stream moved to another endpoint", method=method, reason=exc.message)
            finally:
                endpoint.outstanding -= 1

    def stub(self, interface: type[T]) -> T:
        """An object typed as ``interface`` whose methods call through the pool."""
        return make_stub(self, interface)
