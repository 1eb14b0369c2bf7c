"""Pytest fixtures for testing vrpc services (TESTS ONLY; needs pytest-asyncio).

Opt-in: pytest does not load this module by itself. Enable it in the top-level ``conftest.py``
(or a test module) with ``pytest_plugins = ["vrpc.testing.pytest_plugin"]``, on the command
line with ``-p vrpc.testing.pytest_plugin``, or with ``vrpc_fixtures = true`` in the pytest
configuration (the ``vrpc`` entry point reads that setting). Then:

* ``vrpc_services``: override it to return the service instances to serve;
* ``vrpc_server_options``: override it to pass options to ``vrpc.Server`` (default none);
* ``vrpc_client``: a client connected to a fresh in-memory server for ``vrpc_services``;
* ``vrpc_serve``: ``vrpc.testing.serve_for_tests``, for tests that serve several set-ups;
* ``vrpc_attester``: the INSECURE test attester the other fixtures use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from vrpc.attestation import InsecureTestAttester
from vrpc.client import Client
from vrpc.service import Service
from vrpc.testing import insecure_test_attester, serve_for_tests


@pytest.fixture
def vrpc_services() -> list[Service]:
    raise pytest.UsageError(
        "vrpc_client needs the services to serve: define a fixture named vrpc_services "
        "that returns a list of service instances"
    )


@pytest.fixture
def vrpc_server_options() -> dict[str, Any]:
    return {}


@pytest.fixture
def vrpc_attester() -> InsecureTestAttester:
    return insecure_test_attester()


@pytest_asyncio.fixture
async def vrpc_client(
    vrpc_services: list[Service],
    vrpc_server_options: dict[str, Any],
    vrpc_attester: InsecureTestAttester,
) -> AsyncIterator[Client]:
    async with serve_for_tests(
        vrpc_services, attester=vrpc_attester, server_options=vrpc_server_options
    ) as client:
        yield client


@pytest.fixture
def vrpc_serve() -> Callable[..., Any]:
    return serve_for_tests
