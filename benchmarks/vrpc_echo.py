"""vrpc itself: ``services.echo`` over an attested, encrypted session (or plaintext on request).

The test attester (``InsecureTestAttester(seed=b"bench")``) stands in for the NSM; with the same
seed the client process rebuilds the same trust root and PCR policy.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import structlog

import vrpc
from benchmarks._base import Closer
from services.echo import Echo, EchoImpl

SEED = b"bench"


def quiet_logs() -> None:
    """Keep per-connection INFO/WARNING lines out of the measurement (console rendering is slow).

    The insecure root warns on every verification; the figures are for the protocol, not logging.
    """
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


async def start_server(address: str) -> Closer:
    quiet_logs()
    att = vrpc.InsecureTestAttester(seed=SEED)
    server = vrpc.Server([EchoImpl()], attester=att, allow_plaintext=True)
    await server.start(address)

    async def close() -> None:
        await server.close(grace=0)

    return close


class VrpcClient:
    def __init__(self, client: vrpc.Client) -> None:
        self.client = client
        self.stub = client.stub(Echo)

    async def echo(self, payload: bytes) -> bytes:
        return await self.stub.echo(payload)

    async def stream(self, size: int, count: int) -> int:
        total = 0
        async for item in self.stub.stream(size, count):
            total += len(item)
        return total

    async def close(self) -> None:
        await self.client.close()


@functools.cache
def _trust() -> tuple[Any, Any]:
    att = vrpc.InsecureTestAttester(seed=SEED)
    return att.policy(), att.trust_root()


def make_client(address: str, *, plaintext: bool) -> vrpc.Client:
    if plaintext:
        return vrpc.connect(address, plaintext=True)
    policy, root = _trust()
    return vrpc.connect(address, policy=policy, root=root)


async def open_client(address: str, *, plaintext: bool = False) -> VrpcClient:
    client = make_client(address, plaintext=plaintext)
    await client.connect()
    return VrpcClient(client)
