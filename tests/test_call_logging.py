"""Per-call structured log lines: method, status, duration, peer; never arguments or results."""

from __future__ import annotations

from collections.abc import Callable

import structlog

import vrpc
from services.echo import Echo, EchoImpl


async def test_log_calls_writes_one_line_per_call_without_payloads(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    uri = new_uri()
    marker = b"SECRET-PAYLOAD-MARKER"
    server = vrpc.Server([EchoImpl()], attester=attester, log_calls=True)
    await server.start(uri)
    try:
        async with vrpc.connect(uri, policy=attester.policy(), root=attester.trust_root()) as c:
            with structlog.testing.capture_logs() as logs:
                assert await c.stub(Echo).echo(marker) == marker
                try:
                    await c.call("echo.v1.nope", [])
                except vrpc.RpcError:
                    pass
    finally:
        await server.close(grace=0)
    calls = [entry for entry in logs if entry["event"] == "call"]
    assert [(e["method"], e["status"]) for e in calls] == [
        ("echo.v1.echo", "OK"),
    ]
    assert calls[0]["ms"] >= 0 and calls[0]["peer"]
    assert all(marker not in repr(entry).encode() for entry in logs)


async def test_calls_are_not_logged_by_default(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    uri = new_uri()
    server = vrpc.Server([EchoImpl()], attester=attester)
    await server.start(uri)
    try:
        async with vrpc.connect(uri, policy=attester.policy(), root=attester.trust_root()) as c:
            with structlog.testing.capture_logs() as logs:
                await c.stub(Echo).echo(b"x")
    finally:
        await server.close(grace=0)
    assert not [entry for entry in logs if entry["event"] == "call"]
