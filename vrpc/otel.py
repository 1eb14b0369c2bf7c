"""OpenTelemetry tracing for vrpc calls (the ``vrpc[otel]`` extra: ``opentelemetry-api``).

::

    client = vrpc.connect(uri, policy=policy, interceptors=[vrpc.otel.ClientTracing()])
    server = vrpc.Server([impl], interceptors=[vrpc.otel.ServerTracing()])

Each call gets a span named ``service/method`` (``SpanKind.CLIENT`` on the caller,
``SpanKind.SERVER`` on the server) with the RPC semantic-convention attributes ``rpc.system``
("vrpc"), ``rpc.service``, ``rpc.method`` and ``rpc.vrpc.status_code`` (the numeric
:class:`vrpc.Status`, as ``rpc.grpc.status_code`` is for gRPC). A call that ends with any other
status than OK gets span status ERROR, described by the status name only.

The client injects the trace context into the call's metadata with the OpenTelemetry propagator
API (W3C ``traceparent``/``tracestate`` with the default propagator); the server extracts it, so
the caller's span is the parent of the server's span and both form one trace across the
host→enclave hop.

Nothing from arguments, results or error messages goes into spans: an error message may quote
what the caller sent, and enclaves exist to keep such data in. Exceptions are not recorded as span
events for the same reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import Status as SpanStatus
from opentelemetry.trace.status import StatusCode

from vrpc._version import __version__
from vrpc.client import ClientInterceptor
from vrpc.context import CallContext
from vrpc.exceptions import RpcError
from vrpc.status import Status

__all__ = ["STATUS_CODE_ATTRIBUTE", "ClientTracing", "ServerTracing"]

#: The attribute carrying the call's numeric vrpc status.
STATUS_CODE_ATTRIBUTE = "rpc.vrpc.status_code"

# A trace context header is short (traceparent is 55 characters; tracestate is bounded at 32
# members by W3C). Metadata comes from the peer: anything longer or not a string is ignored.
_MAX_HEADER_LENGTH = 8192


class _MetadataGetter(Getter[dict[str, Any]]):
    def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, str) and len(value) <= _MAX_HEADER_LENGTH:
            return [value]
        return None

    def keys(self, carrier: dict[str, Any]) -> list[str]:
        return [k for k in carrier if isinstance(k, str)]


_GETTER = _MetadataGetter()


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.rpartition(".")
    return service, name


def _attributes(method: str) -> dict[str, str]:
    service, name = _split(method)
    return {"rpc.system": "vrpc", "rpc.service": service, "rpc.method": name}


def _finish(span: trace.Span, status: Status) -> None:
    span.set_attribute(STATUS_CODE_ATTRIBUTE, int(status))
    if status is not Status.OK:
        span.set_status(SpanStatus(StatusCode.ERROR, status.name))


def _status_of(exc: BaseException) -> Status:
    if isinstance(exc, RpcError):
        return exc.status
    if isinstance(exc, asyncio.CancelledError):
        return Status.CANCELLED
    # The server turns any other handler exception into INTERNAL; on the client a local failure
    # (e.g. a refused attestation) never produced a status from the server.
    return Status.INTERNAL if isinstance(exc, Exception) else Status.UNKNOWN


def _tracer(tracer_provider: trace.TracerProvider | None) -> trace.Tracer:
    return trace.get_tracer("vrpc", __version__, tracer_provider=tracer_provider)


class ClientTracing(ClientInterceptor):
    """A client interceptor: one CLIENT span per call, trace context sent in the metadata.

    ``tracer_provider`` and ``propagator`` default to the globally configured ones.

    A streaming call (``client.stream``, streaming stub methods) gets one span for its whole
    lifetime: from the start of the call to its last item, its error, or the caller closing
    the stream early (status CANCELLED).
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = _tracer(tracer_provider)
        self._propagator = propagator

    async def intercept(
        self, method: str, metadata: dict[str, Any], call_next: Callable[[], Any]
    ) -> Any:
        service, name = _split(method)
        with self._tracer.start_as_current_span(
            f"{service}/{name}",
            kind=SpanKind.CLIENT,
            attributes=_attributes(method),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            propagator = self._propagator or propagate.get_global_textmap()
            propagator.inject(metadata)
            try:
                result = await call_next()
            except BaseException as exc:
                _finish(span, _status_of(exc))
                raise
            _finish(span, Status.OK)
            return result

    async def intercept_stream(
        self,
        method: str,
        metadata: dict[str, Any],
        call_next: Callable[[], AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        service, name = _split(method)
        # Not made the current span: this generator's body runs in the caller's context between
        # items, and may be closed from another one; the span is passed explicitly instead.
        span = self._tracer.start_span(
            f"{service}/{name}",
            kind=SpanKind.CLIENT,
            attributes=_attributes(method),
            record_exception=False,
            set_status_on_exception=False,
        )
        items: AsyncIterator[Any] | None = None
        try:
            propagator = self._propagator or propagate.get_global_textmap()
            propagator.inject(metadata, context=trace.set_span_in_context(span))
            items = call_next()
            try:
                async for item in items:
                    yield item
            except GeneratorExit:
                _finish(span, Status.CANCELLED)  # the caller stopped before the end
                raise
            except BaseException as exc:
                _finish(span, _status_of(exc))
                raise
            _finish(span, Status.OK)
        finally:
            try:
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()  # abandons the call now if the caller stopped early
            finally:
                span.end()


class ServerTracing:
    """A server interceptor: one SERVER span per call, child of the caller's span when the
    call's metadata carries a trace context.

    ``tracer_provider`` and ``propagator`` default to the globally configured ones. For a
    server-streaming method the span lasts until the last item is sent.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = _tracer(tracer_provider)
        self._propagator = propagator

    async def __call__(self, ctx: CallContext, call_next: Callable[[], Any]) -> Any:
        propagator = self._propagator or propagate.get_global_textmap()
        parent = propagator.extract(ctx.metadata, getter=_GETTER)
        service, name = _split(ctx.method)
        with self._tracer.start_as_current_span(
            f"{service}/{name}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=_attributes(ctx.method),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await call_next()
            except BaseException as exc:
                _finish(span, _status_of(exc))
                raise
            _finish(span, Status.OK)
            return result
