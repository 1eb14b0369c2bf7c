"""Testing kit: serve services in memory and call them over a real attested session. TESTS ONLY.

``serve_for_tests`` starts a ``vrpc.Server`` on a fresh ``memory://`` address with the INSECURE
test attester, connects a client that trusts exactly that attester's root and PCRs, and closes
both afterwards::

    async with vrpc.testing.serve_for_tests([GreeterImpl()]) as client:
        assert await client.stub(Greeter).greet("Ada") == "Hello, Ada!"

The handshake, the attestation document's verification, the encryption and the codec are the
production code paths; only the trust anchor is a locally generated test root. Trusting that
root needs ``VRPC_INSECURE_TEST_ATTESTATION=1``: the kit sets it itself, only while it builds the
client's trust root, and puts the previous value back, so nothing else in the process starts
trusting test roots. Like the test attester, it refuses to run where ``/dev/nsm`` exists.

Pytest fixtures built on this live in ``vrpc.testing.pytest_plugin`` (opt-in; see
docs/testing.md).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from vrpc.attestation import INSECURE_ENV_VAR, InsecureTestAttester, TrustRoot
from vrpc.client import Client
from vrpc.server import Server
from vrpc.service import Service

__all__ = [
    "DEFAULT_SEED",
    "client_for_tests",
    "insecure_test_attester",
    "insecure_test_root",
    "serve_for_tests",
    "server_for_tests",
]

#: The seed of the test attester the kit uses unless told otherwise.
DEFAULT_SEED = b"vrpc.testing"

_addresses = itertools.count()


@functools.lru_cache(maxsize=16)
def insecure_test_attester(seed: bytes = DEFAULT_SEED) -> InsecureTestAttester:
    """The INSECURE test attester for ``seed``, built once per process (it costs milliseconds)."""
    return InsecureTestAttester(seed=seed)


@contextlib.contextmanager
def _insecure_roots_allowed() -> Iterator[None]:
    previous = os.environ.get(INSECURE_ENV_VAR)
    os.environ[INSECURE_ENV_VAR] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[INSECURE_ENV_VAR]
        else:
            os.environ[INSECURE_ENV_VAR] = previous


def insecure_test_root(attester: InsecureTestAttester) -> TrustRoot:
    """``attester``'s root as a TrustRoot, with the environment opt-in scoped to this call."""
    with _insecure_roots_allowed():
        return attester.trust_root()


def _memory_uri() -> str:
    return f"memory://vrpc-testing-{os.getpid()}-{next(_addresses)}"


def client_for_tests(
    uri: str, *, attester: InsecureTestAttester | None = None, **options: Any
) -> Client:
    """An unconnected client for ``uri`` that trusts ``attester`` (default: the kit's) only:
    its root and its PCRs. ``options`` go to ``vrpc.Client``."""
    attester = attester or insecure_test_attester()
    options.setdefault("policy", attester.policy())
    return Client(uri, root=insecure_test_root(attester), **options)


@contextlib.asynccontextmanager
async def server_for_tests(
    services: Sequence[Service],
    *,
    uri: str | None = None,
    attester: InsecureTestAttester | None = None,
    **server_options: Any,
) -> AsyncIterator[Server]:
    """A started server for ``services`` attesting with the test attester; closed afterwards.

    ``uri`` defaults to a fresh ``memory://`` address (``server.uri`` is not kept: pass your own
    to know it); ``server_options`` go to ``vrpc.Server``.
    """
    server = Server(list(services), attester=attester or insecure_test_attester(), **server_options)
    await server.start(uri or _memory_uri())
    try:
        yield server
    finally:
        await server.close(grace=0)


@contextlib.asynccontextmanager
async def serve_for_tests(
    services: Sequence[Service],
    *,
    uri: str | None = None,
    attester: InsecureTestAttester | None = None,
    server_options: dict[str, Any] | None = None,
    **client_options: Any,
) -> AsyncIterator[Client]:
    """Serve ``services`` (instances) and yield a connected client that trusts the test
    attester; the client and the server are closed afterwards.

    ``uri`` defaults to a fresh ``memory://`` address; ``server_options`` go to ``vrpc.Server``
    and ``client_options`` to ``vrpc.Client``.
    """
    attester = attester or insecure_test_attester()
    uri = uri or _memory_uri()
    async with (
        server_for_tests(services, uri=uri, attester=attester, **(server_options or {})),
        client_for_tests(uri, attester=attester, **client_options) as client,
    ):
        yield client
