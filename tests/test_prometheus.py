"""Metrics for Prometheus: the exposition text, the connection/handshake/attestation counters,
and the host-side path for enclaves (``vrpc metrics`` relaying ``vrpc.reflection.prometheus``
over loopback HTTP), end to end."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import vrpc
from vrpc import cli
from vrpc.exceptions import (
    BindingMismatch,
    CertificateExpired,
    HandshakeError,
    PolicyViolation,
    RemoteProtocolError,
)
from vrpc.metrics import Metrics, handshake_failure_reason
from vrpc.prometheus import render

Serve = Callable[..., Any]
Sample = tuple[str, tuple[tuple[str, str], ...]]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def free_tcp_port() -> int:
    # A port the kernel picked on loopback, released at once for the server to take.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Counted(vrpc.Service, name="counted.v1"):
    @vrpc.rpc
    async def ok(self) -> int: ...

    @vrpc.rpc
    async def slow(self, seconds: float) -> int: ...

    @vrpc.rpc
    async def denied(self) -> int: ...


class CountedImpl(Counted):
    async def ok(self) -> int:
        return 1

    async def slow(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return 2

    async def denied(self) -> int:
        raise vrpc.RpcError(vrpc.Status.PERMISSION_DENIED, "no")


def parse(text: str) -> dict[Sample, float]:
    """Every sample of an exposition; fails on a line that is not valid text format."""
    assert text.endswith("\n")
    samples: dict[Sample, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, _, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no TYPE line"
        pairs = tuple(_LABEL.findall(labels or ""))
        key = (name, pairs)
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)
    return samples


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    found = [v for (n, ls), v in samples.items() if n == name and tuple(sorted(ls)) == want]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def buckets(samples: dict[Sample, float], name: str, **labels: str) -> list[tuple[str, float]]:
    out = []
    for (n, ls), v in samples.items():
        d = dict(ls)
        le = d.pop("le", None)
        if n == f"{name}_bucket" and d == labels and le is not None:
            out.append((le, v))
    return out


async def http_get(port: int, target: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(h.split(": ", 1) for h in header_lines)
    assert int(headers["Content-Length"]) == len(body)
    return int(status_line.split()[1]), body.decode()


@contextlib.asynccontextmanager
async def metrics_relay(uri: str, *options: str, timeout: float = 2) -> AsyncIterator[int]:
    """``vrpc metrics URI --http 127.0.0.1:PORT ...`` running in this process; yields PORT."""
    port = free_tcp_port()
    args = cli._parser().parse_args(
        ["metrics", uri, "--http", f"127.0.0.1:{port}", "--timeout", str(timeout), *options]
    )
    task = asyncio.create_task(args.func(args))
    try:
        for _ in range(200):  # up to ~2 s for the listener
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        yield port
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_scrape_through_the_host_relay_finds_the_calls_made(
    serve: Serve, uri_on: Callable[[str, Path], str], tmp_path: Path
) -> None:
    uri = uri_on("unix", tmp_path)
    async with serve(uri, [CountedImpl()]) as (_, client):
        stub = client.stub(Counted)
        for _ in range(3):
            assert await stub.ok() == 1
        assert await stub.slow(0.03) == 2
        for _ in range(2):
            with pytest.raises(vrpc.RpcError):
                await stub.denied()
        async with metrics_relay(uri, "--insecure-test-seed", "tests") as port:
            status, text = await http_get(port)
            _, second = await http_get(port)
    assert status == 200
    # One call per scrape, over the session the relay keeps between scrapes.
    again = parse(second)
    scrape = {"method": "vrpc.reflection.prometheus", "status": "OK"}
    assert value(again, "vrpc_server_calls_total", **scrape) == 1
    assert value(again, "vrpc_server_handshakes_total", mode="dev-insecure") == 2
    samples = parse(text)
    assert value(samples, "vrpc_enclave_up") == 1
    assert value(samples, "vrpc_server_calls_total", method="counted.v1.ok", status="OK") == 3
    assert value(samples, "vrpc_server_calls_total", method="counted.v1.slow", status="OK") == 1
    denied = {"method": "counted.v1.denied", "status": "PERMISSION_DENIED"}
    assert value(samples, "vrpc_server_calls_total", **denied) == 2
    ok = buckets(samples, "vrpc_server_call_duration_seconds", method="counted.v1.ok")
    assert ok[-1] == ("+Inf", 3)
    counts = [c for _, c in ok]
    assert counts == sorted(counts), "buckets are cumulative"
    slow = dict(buckets(samples, "vrpc_server_call_duration_seconds", method="counted.v1.slow"))
    # 30 ms of sleep: not within 25 ms, within 5 s.
    assert slow["0.025"] == 0 and slow["5"] == 1 and slow["+Inf"] == 1
    assert value(samples, "vrpc_server_call_duration_seconds_count", method="counted.v1.slow") == 1
    assert value(samples, "vrpc_server_call_duration_seconds_sum", method="counted.v1.slow") >= 0.03
    # The test's client and the relay's own client each completed a handshake.
    assert value(samples, "vrpc_server_handshakes_total", mode="dev-insecure") == 2
    assert value(samples, "vrpc_server_connections_accepted_total") == 2
    assert value(samples, "vrpc_server_connections") == 2
    assert value(samples, "vrpc_server_handshake_duration_seconds_count") == 2
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_an_unreachable_enclave_is_reported_as_down(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    uri = f"unix://{tmp_path / 'nobody.sock'}"
    async with metrics_relay(uri, "--insecure-test-seed", "tests", timeout=0.3) as port:
        status, text = await http_get(port)
    assert status == 200
    samples = parse(text)
    assert value(samples, "vrpc_enclave_up") == 0
    assert value(samples, "vrpc_enclave_scrape_failures_total", reason="unavailable") == 1
    assert not any(name.startswith("vrpc_server_") for name, _ in samples)


async def test_an_enclave_failing_attestation_is_down_with_the_reason(
    server_at: Callable[..., Any], uri_on: Callable[[str, Path], str], tmp_path: Path
) -> None:
    uri = uri_on("unix", tmp_path)
    wrong = vrpc.InsecureTestAttester(seed=b"tests", pcrs={2: b"\x07" * 48})
    policy = tmp_path / "policy.json"
    policy.write_text(wrong.policy().dump())
    async with server_at(uri, [CountedImpl()]) as server:
        async with metrics_relay(
            uri, "--insecure-test-seed", "tests", "--policy", str(policy)
        ) as port:
            _, text = await http_get(port)
        samples = parse(text)
        assert value(samples, "vrpc_enclave_up") == 0
        reason = {"reason": "policy_violation"}
        assert value(samples, "vrpc_enclave_scrape_failures_total", **reason) == 1
        # The enclave side counts the client's refusal of its document.
        own = parse(render(server.metrics, connections=0, calls_in_flight=0))
        refused = {"reason": "peer_attestation_refused"}
        assert value(own, "vrpc_server_handshake_failures_total", **refused) == 1


async def test_the_http_side_serves_only_get_metrics(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    relay = metrics_relay(f"unix://{tmp_path / 'x.sock'}", "--insecure-test-seed", "t", timeout=0.3)
    async with relay as port:
        assert (await http_get(port, "/"))[0] == 404
        assert (await http_get(port, "/metrics", method="POST"))[0] == 405
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"nonsense\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 431 ")
        writer.close()


def test_the_http_address_must_be_host_and_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["metrics", "unix:///x", "--http", "9464"])
    assert exit_.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


async def test_handshake_failures_are_counted_by_reason(
    server_at: Callable[..., Any],
    new_client: Callable[..., vrpc.Client],
    uri_on: Callable[[str, Path], str],
    tmp_path: Path,
) -> None:
    uri = uri_on("unix", tmp_path)
    path = uri.removeprefix("unix://")
    async with server_at(uri, [CountedImpl()], handshake_timeout=0.05) as server:
        # A client that asks for plaintext (not allowed): mode_refused.
        with pytest.raises(vrpc.HandshakeError):
            async with vrpc.connect(uri, plaintext=True, connect_timeout=0.5):
                pass
        # A peer that connects and says nothing: timeout.
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # A peer that connects and leaves: connection_lost.
        _, writer = await asyncio.open_unix_connection(path)
        writer.close()
        for _ in range(100):
            if server.metrics.handshake_failures.get("connection_lost"):
                break
            await asyncio.sleep(0.01)
        async with new_client(uri) as client:
            await client.stub(Counted).ok()
        samples = parse(render(server.metrics, connections=0, calls_in_flight=0))
    failures = "vrpc_server_handshake_failures_total"
    assert value(samples, failures, reason="mode_refused") == 1
    assert value(samples, failures, reason="timeout") == 1
    assert value(samples, failures, reason="connection_lost") == 1
    assert value(samples, "vrpc_server_handshakes_total", mode="dev-insecure") == 1
    assert value(samples, "vrpc_server_connections_accepted_total") == 4


async def test_refused_client_attestation_counts_as_an_attestation_failure(
    attester: vrpc.InsecureTestAttester, uri_on: Callable[[str, Path], str], tmp_path: Path
) -> None:
    uri = uri_on("unix", tmp_path)
    expected = vrpc.InsecureTestAttester(seed=b"initiator", pcrs={0: b"\x42" * 48})
    impostor = vrpc.InsecureTestAttester(seed=b"initiator", pcrs={0: b"\x13" * 48})
    server = vrpc.Server(
        [CountedImpl()],
        attester=attester,
        mutual_verifier=vrpc.Verifier(expected.policy(), expected.trust_root()),
    )
    await server.start(uri)
    try:
        with pytest.raises((vrpc.HandshakeError, vrpc.RpcError)):
            async with vrpc.connect(
                uri,
                policy=attester.policy(),
                root=attester.trust_root(),
                mutual_attester=impostor,
                connect_timeout=0.5,
            ) as client:
                await client.stub(Counted).ok()
        for _ in range(100):
            if server.metrics.attestation_failures:
                break
            await asyncio.sleep(0.01)
    finally:
        await server.close(grace=0)
    samples = parse(render(server.metrics, connections=0, calls_in_flight=0))
    reason = {"reason": "policy_violation"}
    assert value(samples, "vrpc_server_attestation_failures_total", **reason) == 1
    assert value(samples, "vrpc_server_handshake_failures_total", **reason) == 1


async def test_the_connection_limit_refusal_is_counted(
    server_at: Callable[..., Any],
    new_client: Callable[..., vrpc.Client],
    uri_on: Callable[[str, Path], str],
    tmp_path: Path,
) -> None:
    uri = uri_on("unix", tmp_path)
    async with server_at(uri, [CountedImpl()], max_connections=1) as server:
        async with new_client(uri) as first:
            await first.stub(Counted).ok()
            with pytest.raises((vrpc.HandshakeError, vrpc.RpcError)):
                async with new_client(uri, connect_timeout=0.2) as second:
                    await second.stub(Counted).ok()
        assert server.metrics.connections_refused["limit"] >= 1


def test_reasons_are_a_small_fixed_set() -> None:
    assert handshake_failure_reason(PolicyViolation("PCR0 mismatch")) == "policy_violation"
    assert handshake_failure_reason(BindingMismatch("x")) == "binding_mismatch"
    assert handshake_failure_reason(CertificateExpired("x")) == "certificate_expired"
    assert handshake_failure_reason(HandshakeError("attestation failed: nsm")) == "attester_error"
    assert handshake_failure_reason(HandshakeError("handshake timed out")) == "timeout"
    assert (
        handshake_failure_reason(HandshakeError("peer aborted the handshake (code 99)"))
        == "peer_other"
    )
    assert handshake_failure_reason(HandshakeError("client Finished MAC is invalid")) == (
        "finished_invalid"
    )
    for message, reason in (
        ("client asked for an unknown service", "unknown_service"),
        ("mutual attestation required by the server", "mutual_refused"),
        ("client mode 'prod' does not match server mode 'dev-insecure'", "mode_refused"),
        ("peer aborted the handshake (attestation_refused)", "peer_attestation_refused"),
    ):
        assert handshake_failure_reason(HandshakeError(message)) == reason
    # Free text from a peer never becomes a label.
    assert handshake_failure_reason(RemoteProtocolError("evil\nlabel")) == "protocol_error"
    assert handshake_failure_reason(HandshakeError("whatever the peer said")) == "protocol_error"
    metrics = Metrics()
    assert metrics.handshake_failed(HandshakeError("attestation failed: /dev/nsm")) == (
        "attester_error"
    )
    assert metrics.attestation_failures == {"attester_error": 1}


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.record('odd"name\\with\nnewline', vrpc.Status.UNIMPLEMENTED, 0.0)
    text = render(metrics, connections=0, calls_in_flight=0)
    assert 'method="odd\\"name\\\\with\\nnewline"' in text
    samples = parse(text)
    name = 'odd\\"name\\\\with\\nnewline'
    assert value(samples, "vrpc_server_calls_total", method=name, status="UNIMPLEMENTED") == 1


class Blocking(vrpc.Service, name="blocking.v1"):
    @vrpc.rpc
    async def block(self, seconds: float) -> None: ...


class BlockingImpl(Blocking):
    async def block(self, seconds: float) -> None:
        time.sleep(seconds)  # noqa: ASYNC251 - the mistake the counter is there to reveal


async def test_a_blocked_event_loop_is_counted(
    serve: Serve, uri_on: Callable[[str, Path], str], tmp_path: Path
) -> None:
    uri = uri_on("unix", tmp_path)
    async with serve(uri, [BlockingImpl()], {"loop_lag_warning": 0.02}) as (_, client):
        await client.stub(Blocking).block(0.15)
        text = await client.call("vrpc.reflection.prometheus", [])
    assert value(parse(text), "vrpc_server_event_loop_blocked_total") >= 1


async def test_without_reflection_there_is_no_exposition(
    serve: Serve, uri_on: Callable[[str, Path], str], tmp_path: Path
) -> None:
    uri = uri_on("unix", tmp_path)
    async with serve(uri, [CountedImpl()], {"reflection": False}) as (_, client):
        with pytest.raises(vrpc.RpcError) as missing:
            await client.call("vrpc.reflection.prometheus", [])
    assert missing.value.status is vrpc.Status.UNIMPLEMENTED
