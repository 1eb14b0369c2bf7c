"""Long-lived clients re-attest: a connection older than ``max_session_age`` is replaced by a
fresh handshake (a new attestation document) for new calls, and retired once its calls finish."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import vrpc
from services.echo import Echo, EchoImpl


class CountingAttester:
    """The test attester, counting the documents it produced (one per handshake)."""

    insecure = True

    def __init__(self, inner: vrpc.InsecureTestAttester) -> None:
        self.inner = inner
        self.documents = 0

    def attest(self, **fields: Any) -> bytes:
        self.documents += 1
        return self.inner.attest(**fields)


async def test_old_connection_is_replaced_by_a_fresh_handshake(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    uri = new_uri()
    counting = CountingAttester(attester)
    server = vrpc.Server([EchoImpl()], attester=counting)
    await server.start(uri)
    try:
        async with vrpc.connect(
            uri, policy=attester.policy(), root=attester.trust_root(), max_session_age=0.2
        ) as client:
            echo = client.stub(Echo)
            assert await echo.echo(b"1") == b"1"
            assert counting.documents == 1
            first = client._proto
            assert await echo.echo(b"2") == b"2"
            assert counting.documents == 1  # young connection reused
            await asyncio.sleep(0.3)
            assert await echo.echo(b"3") == b"3"
            assert counting.documents == 2  # a new handshake, a new document
            assert client._proto is not first
            for _ in range(100):  # the retired connection closes once idle
                if first is not None and first.closed:
                    break
                await asyncio.sleep(0.01)
            assert first is not None and first.closed
    finally:
        await server.close(grace=0)
