"""Shared fixtures for the end-to-end tests: a vrpc server with the insecure test attester,
reachable over each local transport (in-memory, Unix socket, loopback TCP). Built on the
shipped testing kit (vrpc.testing), so the suite exercises it too."""

from __future__ import annotations

import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

import vrpc
from vrpc.testing import client_for_tests, insecure_test_attester, server_for_tests

_names = itertools.count()


def test_attester() -> vrpc.InsecureTestAttester:
    # Built once per process by the kit (the deterministic chain costs a few milliseconds).
    return insecure_test_attester(b"tests")


@pytest.fixture
def insecure_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    yield


def free_tcp_port() -> int:
    # The URI API has no "port 0": take a port the kernel picked and release it at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_uri(transport: str, tmp_path: Path) -> str:
    n = next(_names)
    if transport == "memory":
        return f"memory://test-{n}"
    if transport == "unix":
        return f"unix://{tmp_path / f's{n}.sock'}"
    if transport == "tcp":
        return f"tcp://127.0.0.1:{free_tcp_port()}"
    raise ValueError(transport)


@pytest.fixture(params=["memory", "unix", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_uri(tmp_path: Path, transport: str) -> Callable[[], str]:
    """A fresh address on the test's transport each time it is called."""
    return lambda: make_uri(transport, tmp_path)


@pytest.fixture
def uri(new_uri: Callable[[], str]) -> str:
    return new_uri()


def client_for(uri: str, **options: Any) -> vrpc.Client:
    return client_for_tests(uri, attester=test_attester(), **options)


@contextlib.asynccontextmanager
async def serving(
    uri: str, services: Sequence[vrpc.Service], **server_options: Any
) -> AsyncIterator[vrpc.Server]:
    async with server_for_tests(
        services, uri=uri, attester=test_attester(), **server_options
    ) as server:
        yield server


@contextlib.asynccontextmanager
async def served(
    uri: str,
    services: Sequence[vrpc.Service],
    server_options: dict[str, Any] | None = None,
    **client_options: Any,
) -> AsyncIterator[tuple[vrpc.Server, vrpc.Client]]:
    """A started server and a connected client on ``uri``; both closed afterwards."""
    async with (
        serving(uri, services, **(server_options or {})) as server,
        client_for(uri, **client_options) as client,
    ):
        yield server, client


@pytest.fixture
def serve(insecure_env: None) -> Callable[..., Any]:
    """``async with serve(uri, [impl], server_options, **client_options) as (server, client)``."""
    return served


@pytest.fixture
def server_at(insecure_env: None) -> Callable[..., Any]:
    """``async with server_at(uri, [impl], **server_options) as server``."""
    return serving


@pytest.fixture
def new_client(insecure_env: None) -> Callable[..., vrpc.Client]:
    """``new_client(uri, **options)``: an unconnected client trusting the test attester."""
    return client_for


@pytest.fixture
def attester(insecure_env: None) -> vrpc.InsecureTestAttester:
    """The session's insecure test attester (the environment opt-in is set)."""
    return test_attester()


@pytest.fixture
def uri_on() -> Callable[[str, Path], str]:
    """``uri_on(transport, tmp_path)``: a fresh address on a given transport."""
    return make_uri


@pytest.fixture
def keep_structlog_config() -> Iterator[None]:
    """Put structlog's configuration back after a test whose code reconfigures it (the CLI and
    the demo own their process and configure logging)."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()
