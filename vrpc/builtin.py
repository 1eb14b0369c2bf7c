"""Built-in services every server exposes: health and reflection (with metrics)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vrpc.exceptions import RpcError
from vrpc.metrics import ServerView
from vrpc.service import Service, rpc
from vrpc.status import Status

__all__ = ["Health", "HealthApi", "MethodInfo", "Reflection", "ReflectionApi"]

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"


class HealthApi(Service, name="vrpc.health"):
    @rpc(idempotent=True)
    async def check(self, service: str = "") -> str:
        """SERVING or NOT_SERVING for one service, or for the whole server with ""."""
        raise NotImplementedError


class Health(HealthApi):
    def __init__(self, server: ServerView) -> None:
        self._server = server
        self._overall = SERVING
        self._status: dict[str, str] = {}

    def set_status(self, service: str, serving: bool) -> None:
        self._status[service] = SERVING if serving else NOT_SERVING

    def set_all_not_serving(self) -> None:
        self._overall = NOT_SERVING
        for name in self._status:
            self._status[name] = NOT_SERVING

    async def check(self, service: str = "") -> str:
        if not service:
            return self._overall
        if service in self._status:
            return self._status[service] if self._overall == SERVING else NOT_SERVING
        known = {spec.service for spec in self._server.methods.values()}
        if service not in known:
            raise RpcError(Status.NOT_FOUND, f"unknown service {service!r}")
        return self._overall


@dataclasses.dataclass
class MethodInfo:
    name: str
    kind: str
    signature: str
    idempotent: bool
    # JSON Schema of the arguments (an object, one property per parameter in declaration
    # order), the result and any streamed request items (vrpc._schema.method_schema).
    schema: dict[str, Any] = dataclasses.field(default_factory=dict)


class ReflectionApi(Service, name="vrpc.reflection"):
    @rpc(idempotent=True)
    async def list_services(self) -> dict[str, list[MethodInfo]]:
        raise NotImplementedError

    @rpc(idempotent=True)
    async def metrics(self) -> dict[str, Any]:
        raise NotImplementedError

    @rpc(idempotent=True)
    async def prometheus(self) -> str:
        """The metrics in Prometheus' text exposition format (``vrpc metrics`` relays it)."""
        raise NotImplementedError


class Reflection(ReflectionApi):
    def __init__(self, server: ServerView) -> None:
        self._server = server
        self._listing: dict[str, list[MethodInfo]] | None = None

    async def list_services(self) -> dict[str, list[MethodInfo]]:
        if self._listing is None:  # the methods never change: build the listing once
            from vrpc._schema import method_schema

            out: dict[str, list[MethodInfo]] = {}
            for spec in self._server.methods.values():
                out.setdefault(spec.service, []).append(
                    MethodInfo(
                        spec.full_name,
                        spec.kind.value,
                        spec.signature,
                        spec.idempotent,
                        method_schema(spec),
                    )
                )
            self._listing = out
        return self._listing

    async def metrics(self) -> dict[str, Any]:
        return {
            "connections": self._server.connection_count,
            "calls_in_flight": self._server.calls_in_flight,
            "methods": self._server.metrics.snapshot(),
        }

    async def prometheus(self) -> str:
        from vrpc.prometheus import render_server

        return render_server(self._server)
