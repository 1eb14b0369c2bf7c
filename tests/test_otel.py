"""OpenTelemetry tracing over a real connection: one trace across client and server, the RPC
attributes, status on error, and nothing from arguments or results in the spans."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="needs the test extra (opentelemetry-sdk)")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import vrpc
from vrpc.otel import STATUS_CODE_ATTRIBUTE, ClientTracing, ServerTracing

SECRET = "s3cret-argument-value"
RESULT_SECRET = "result-value-never-in-spans"


class Traced(vrpc.Service, name="traced.v1"):
    @vrpc.rpc
    async def echo(self, text: str) -> str: ...

    @vrpc.rpc
    async def refuse(self, text: str) -> str: ...

    @vrpc.rpc
    async def crash(self) -> str: ...

    @vrpc.rpc
    async def headers(self) -> dict[str, Any]: ...

    @vrpc.rpc
    def count(self, n: int) -> AsyncIterator[int]: ...


class TracedImpl(Traced):
    async def echo(self, text: str) -> str:
        return f"{RESULT_SECRET}:{text}"

    async def refuse(self, text: str) -> str:
        raise vrpc.RpcError(vrpc.Status.PERMISSION_DENIED, f"no access for {text}")

    async def crash(self) -> str:
        raise RuntimeError(SECRET)

    async def headers(self) -> dict[str, Any]:
        return dict(vrpc.current_call().metadata)

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def tracing() -> tuple[InMemorySpanExporter, InMemorySpanExporter, ClientTracing, ServerTracing]:
    # Separate providers for the two sides, as on a host and in an enclave: the only link
    # between their spans is the metadata.
    client_provider, client_spans = _provider()
    server_provider, server_spans = _provider()
    return (
        client_spans,
        server_spans,
        ClientTracing(tracer_provider=client_provider),
        ServerTracing(tracer_provider=server_provider),
    )


def _only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    spans = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    return spans[0]


def _everything_in(span: ReadableSpan) -> str:
    parts = [span.name, repr(dict(span.attributes or {})), repr(span.status.description)]
    parts += [f"{e.name}{dict(e.attributes or {})}" for e in span.events]
    return " ".join(parts)


async def test_one_trace_across_client_and_server(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    client_spans, server_spans, client_tracing, server_tracing = tracing
    uri = uri_on("unix", tmp_path)
    async with serve(
        uri, [TracedImpl()], {"interceptors": [server_tracing]}, interceptors=[client_tracing]
    ) as (_, client):
        assert await client.stub(Traced).echo(SECRET) == f"{RESULT_SECRET}:{SECRET}"
    client_span = _only(client_spans, "traced.v1/echo")
    server_span = _only(server_spans, "traced.v1/echo")
    assert client_span.kind is SpanKind.CLIENT
    assert server_span.kind is SpanKind.SERVER
    assert client_span.context is not None and server_span.context is not None
    assert server_span.context.trace_id == client_span.context.trace_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.parent.is_remote
    for span in (client_span, server_span):
        assert dict(span.attributes or {}) == {
            "rpc.system": "vrpc",
            "rpc.service": "traced.v1",
            "rpc.method": "echo",
            STATUS_CODE_ATTRIBUTE: 0,
        }
        assert span.status.status_code is StatusCode.UNSET
        text = _everything_in(span)
        assert SECRET not in text and RESULT_SECRET not in text


async def test_the_context_travels_as_w3c_traceparent_in_metadata(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    client_spans, _, client_tracing, _ = tracing
    async with serve(uri_on("unix", tmp_path), [TracedImpl()], interceptors=[client_tracing]) as (
        _,
        client,
    ):
        seen = await client.stub(Traced).headers()
    span = _only(client_spans, "traced.v1/headers")
    assert span.context is not None
    version, trace_id, span_id, _flags = seen["traceparent"].split("-")
    assert version == "00"
    assert int(trace_id, 16) == span.context.trace_id
    assert int(span_id, 16) == span.context.span_id


async def test_without_client_tracing_the_server_span_is_a_root(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    _, server_spans, _, server_tracing = tracing
    async with serve(
        uri_on("unix", tmp_path), [TracedImpl()], {"interceptors": [server_tracing]}
    ) as (_, client):
        await client.stub(Traced).echo("x")
    assert _only(server_spans, "traced.v1/echo").parent is None


async def test_error_status_on_both_sides_without_the_message(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    client_spans, server_spans, client_tracing, server_tracing = tracing
    async with serve(
        uri_on("unix", tmp_path),
        [TracedImpl()],
        {"interceptors": [server_tracing]},
        interceptors=[client_tracing],
    ) as (_, client):
        stub = client.stub(Traced)
        with pytest.raises(vrpc.RpcError) as denied:
            await stub.refuse(SECRET)
        assert denied.value.status is vrpc.Status.PERMISSION_DENIED
        with pytest.raises(vrpc.RpcError) as crashed:
            await stub.crash()
        assert crashed.value.status is vrpc.Status.INTERNAL
    for exporter in (client_spans, server_spans):
        refused = _only(exporter, "traced.v1/refuse")
        assert refused.status.status_code is StatusCode.ERROR
        assert refused.status.description == "PERMISSION_DENIED"
        assert (refused.attributes or {})[STATUS_CODE_ATTRIBUTE] == 7
        crashed_span = _only(exporter, "traced.v1/crash")
        assert crashed_span.status.status_code is StatusCode.ERROR
        assert (crashed_span.attributes or {})[STATUS_CODE_ATTRIBUTE] == 13
        for span in (refused, crashed_span):
            assert span.events == ()  # exceptions are not recorded: their text may quote input
            assert SECRET not in _everything_in(span)


async def test_server_streaming_call_is_traced_until_the_last_item(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    _, server_spans, _, server_tracing = tracing
    async with serve(
        uri_on("unix", tmp_path), [TracedImpl()], {"interceptors": [server_tracing]}
    ) as (_, client):
        assert [i async for i in client.stub(Traced).count(3)] == [0, 1, 2]
    span = _only(server_spans, "traced.v1/count")
    assert (span.attributes or {})[STATUS_CODE_ATTRIBUTE] == 0


async def test_a_hostile_traceparent_is_ignored(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    _, server_spans, _, server_tracing = tracing
    async with serve(
        uri_on("unix", tmp_path), [TracedImpl()], {"interceptors": [server_tracing]}
    ) as (_, client):
        for bad in (12345, "00-zz-zz-01", "00-" + "1" * 9000):
            with vrpc.call_options(metadata={"traceparent": bad}):
                assert await client.stub(Traced).echo("x") == f"{RESULT_SECRET}:x"
    spans = server_spans.get_finished_spans()
    assert len(spans) == 3
    assert all(s.parent is None for s in spans)


class Deny:
    async def __call__(self, ctx: vrpc.CallContext, call_next: Callable[[], Any]) -> Any:
        raise vrpc.RpcError(vrpc.Status.UNAUTHENTICATED, "no token")


async def test_tracing_first_sees_calls_a_later_interceptor_denies(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    _, server_spans, _, server_tracing = tracing
    async with serve(
        uri_on("unix", tmp_path), [TracedImpl()], {"interceptors": [server_tracing, Deny()]}
    ) as (_, client):
        with pytest.raises(vrpc.RpcError):
            await client.stub(Traced).echo("x")
    span = _only(server_spans, "traced.v1/echo")
    assert span.status.description == "UNAUTHENTICATED"
    assert (span.attributes or {})[STATUS_CODE_ATTRIBUTE] == 16
