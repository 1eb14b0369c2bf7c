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

    @vrpc.rpc
    def count_then_fail(self, n: int) -> AsyncIterator[int]: ...

    @vrpc.rpc
    async def total(self, numbers: AsyncIterator[int]) -> int: ...

    @vrpc.rpc
    def stream_headers(self) -> AsyncIterator[str]: ...


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

    async def count_then_fail(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise vrpc.RpcError(vrpc.Status.PERMISSION_DENIED, f"stopped: {SECRET}")

    async def total(self, numbers: AsyncIterator[int]) -> int:
        return sum([n async for n in numbers])

    async def stream_headers(self) -> AsyncIterator[str]:
        for key, value in sorted(vrpc.current_call().metadata.items()):
            yield f"{key}={value}"


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


async def test_a_server_streaming_call_makes_one_trace_with_client_and_server_spans(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    client_spans, server_spans, client_tracing, server_tracing = tracing
    async with serve(
        uri_on("unix", tmp_path),
        [TracedImpl()],
        {"interceptors": [server_tracing]},
        interceptors=[client_tracing],
    ) as (_, client):
        assert [i async for i in client.stub(Traced).count(3)] == [0, 1, 2]
        assert [i async for i in client.stream("traced.v1.count", [2])] == [0, 1]
    client_side = [s for s in client_spans.get_finished_spans() if s.name == "traced.v1/count"]
    server_side = [s for s in server_spans.get_finished_spans() if s.name == "traced.v1/count"]
    assert len(client_side) == len(server_side) == 2
    for client_span, server_span in zip(client_side, server_side, strict=True):
        assert client_span.kind is SpanKind.CLIENT
        assert client_span.context is not None and server_span.context is not None
        assert server_span.context.trace_id == client_span.context.trace_id
        assert server_span.parent is not None
        assert server_span.parent.span_id == client_span.context.span_id
        assert (client_span.attributes or {})[STATUS_CODE_ATTRIBUTE] == 0
        assert client_span.status.status_code is StatusCode.UNSET
        # The client span covers the server's whole stream.
        assert client_span.start_time is not None and server_span.start_time is not None
        assert client_span.end_time is not None and server_span.end_time is not None
        assert client_span.start_time <= server_span.start_time
        assert client_span.end_time >= server_span.end_time


async def test_a_streaming_call_carries_traceparent_and_earlier_metadata(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    client_spans, _, client_tracing, _ = tracing
    async with serve(uri_on("unix", tmp_path), [TracedImpl()], interceptors=[client_tracing]) as (
        _,
        client,
    ):
        with vrpc.call_options(metadata={"tenant": "blue"}):
            seen = [line async for line in client.stub(Traced).stream_headers()]
    span = _only(client_spans, "traced.v1/stream_headers")
    assert span.context is not None
    headers = dict(line.split("=", 1) for line in seen)
    assert headers["tenant"] == "blue"
    _version, trace_id, span_id, _flags = headers["traceparent"].split("-")
    assert (int(trace_id, 16), int(span_id, 16)) == (span.context.trace_id, span.context.span_id)


async def test_stream_span_status_on_error_and_on_early_close(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    client_spans, _, client_tracing, _ = tracing
    async with serve(uri_on("unix", tmp_path), [TracedImpl()], interceptors=[client_tracing]) as (
        _,
        client,
    ):
        stub = client.stub(Traced)
        got: list[int] = []
        with pytest.raises(vrpc.RpcError) as denied:
            got.extend([i async for i in stub.count_then_fail(2)])
        assert got == [] and denied.value.status is vrpc.Status.PERMISSION_DENIED
        stream = stub.count(1000)
        async for i in stream:
            assert i == 0
            break
        await stream.aclose()  # type: ignore[attr-defined]
        # The connection is still usable: the abandoned stream was cancelled, not leaked.
        assert [i async for i in stub.count(2)] == [0, 1]
    failed = _only(client_spans, "traced.v1/count_then_fail")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "PERMISSION_DENIED"
    assert SECRET not in _everything_in(failed)
    counts = [s for s in client_spans.get_finished_spans() if s.name == "traced.v1/count"]
    assert [(s.attributes or {})[STATUS_CODE_ATTRIBUTE] for s in counts] == [1, 0]
    assert counts[0].status.description == "CANCELLED"


async def test_a_client_streaming_call_is_traced_to_its_result(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path, tracing: Any
) -> None:
    client_spans, server_spans, client_tracing, server_tracing = tracing

    async def numbers() -> AsyncIterator[int]:
        for n in (1, 2, 3):
            yield n

    async with serve(
        uri_on("unix", tmp_path),
        [TracedImpl()],
        {"interceptors": [server_tracing]},
        interceptors=[client_tracing],
    ) as (_, client):
        assert await client.stub(Traced).total(numbers()) == 6
        # Ended as soon as the result arrived, though the stub stops iterating at the result.
        client_span = _only(client_spans, "traced.v1/total")
    assert (client_span.attributes or {})[STATUS_CODE_ATTRIBUTE] == 0
    server_span = _only(server_spans, "traced.v1/total")
    assert server_span.parent is not None and client_span.context is not None
    assert server_span.parent.span_id == client_span.context.span_id


class Tag(vrpc.ClientInterceptor):
    """Adds metadata to unary calls only: the default ``intercept_stream`` passes streams on."""

    async def intercept(
        self, method: str, metadata: dict[str, Any], call_next: Callable[[], Any]
    ) -> Any:
        metadata["tag"] = "unary"
        return await call_next()


async def test_an_interceptor_without_intercept_stream_passes_streams_through(
    serve: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path
) -> None:
    async with serve(uri_on("unix", tmp_path), [TracedImpl()], interceptors=[Tag()]) as (
        _,
        client,
    ):
        assert [i async for i in client.stub(Traced).count(2)] == [0, 1]
        assert [h async for h in client.stub(Traced).stream_headers()] == []
        assert (await client.stub(Traced).headers())["tag"] == "unary"
