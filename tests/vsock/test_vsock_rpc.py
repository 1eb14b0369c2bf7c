"""vrpc end to end over real AF_VSOCK (CID 1 inside the vsock lab), under asyncio and uvloop.

The attested, encrypted default session with the insecure test attester: typed calls, streaming,
bad input, a refused policy, and the opaque relay from TCP to vsock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import vrpc
from services.echo import Echo, EchoImpl
from vrpc.relay import Relay

BOUND = 30.0


@pytest.fixture
def attester(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> vrpc.InsecureTestAttester:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    return vrpc.InsecureTestAttester(seed=b"vsock-lab")


async def test_typed_calls_and_streams_over_vsock(
    attester: vrpc.InsecureTestAttester, vsock_port: int
) -> None:
    server = vrpc.Server([EchoImpl()], attester=attester)
    await server.start(f"vsock://ANY:{vsock_port}")
    try:
        async with asyncio.timeout(BOUND):
            async with vrpc.connect(
                f"vsock://LOCAL:{vsock_port}", policy=attester.policy(), root=attester.trust_root()
            ) as client:
                echo = client.stub(Echo)
                assert await echo.echo(b"over vsock") == b"over vsock"
                results = await asyncio.gather(*(echo.echo(bytes([i]) * 1000) for i in range(64)))
                assert results == [bytes([i]) * 1000 for i in range(64)]
                big = bytes(range(256)) * 4096
                assert await echo.echo(big) == big
                items = [item async for item in echo.stream(4096, 20)]
                assert items == [b"\x5a" * 4096] * 20

                async def chunks() -> AsyncIterator[bytes]:
                    for _ in range(10):
                        yield b"c" * 1000

                assert await echo.sink(chunks()) == 10_000
                with pytest.raises(vrpc.RpcError) as info:
                    await client.call("echo.v1.echo", ["not bytes"])
                assert info.value.status is vrpc.Status.INVALID_ARGUMENT
                assert await echo.echo(b"still up") == b"still up"
                assert client.peer_claims is not None
    finally:
        await server.close(grace=0)


async def test_wrong_policy_refused_over_vsock(
    attester: vrpc.InsecureTestAttester, vsock_port: int
) -> None:
    server = vrpc.Server([EchoImpl()], attester=attester)
    await server.start(f"vsock://ANY:{vsock_port}")
    policy = attester.policy()
    wrong = vrpc.Policy(pcrs={**policy.pcrs, 0: b"\x01" * 48})
    try:
        async with asyncio.timeout(BOUND):
            with pytest.raises(vrpc.AttestationError, match="PCR0"):
                async with vrpc.connect(
                    f"vsock://LOCAL:{vsock_port}", policy=wrong, root=attester.trust_root()
                ):
                    pass
            async with vrpc.connect(
                f"vsock://LOCAL:{vsock_port}", policy=policy, root=attester.trust_root()
            ) as client:
                assert await client.stub(Echo).echo(b"ok") == b"ok"
    finally:
        await server.close(grace=0)


async def test_relay_tcp_to_vsock_carries_only_ciphertext(
    attester: vrpc.InsecureTestAttester, vsock_port: int, tmp_path: object
) -> None:
    server = vrpc.Server([EchoImpl()], attester=attester)
    await server.start(f"vsock://ANY:{vsock_port}")
    relay = Relay(f"unix://{tmp_path}/relay.sock", f"vsock://LOCAL:{vsock_port}")
    await relay.start()
    marker = b"PLAINTEXT-MARKER-" * 4
    try:
        async with asyncio.timeout(BOUND):
            async with vrpc.connect(
                f"unix://{tmp_path}/relay.sock",
                policy=attester.policy(),
                root=attester.trust_root(),
            ) as client:
                assert await client.stub(Echo).echo(marker) == marker
        assert relay.bytes_relayed > len(marker)
    finally:
        await relay.close()
        await server.close(grace=0)


class Napper(vrpc.Service, name="napper.v1"):
    @vrpc.rpc
    async def nap(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "rested"


async def test_keepalive_and_close_over_vsock(
    attester: vrpc.InsecureTestAttester, vsock_port: int
) -> None:
    # An idle connection and a call longer than the keepalive interval both survive on the same
    # connection; closing is an exchange of CLOSE records, not a truncation.
    server = vrpc.Server([Napper()], attester=attester, keepalive_interval=0.3)
    await server.start(f"vsock://ANY:{vsock_port}")
    try:
        async with asyncio.timeout(BOUND):
            client = vrpc.connect(
                f"vsock://LOCAL:{vsock_port}",
                policy=attester.policy(),
                root=attester.trust_root(),
                keepalive_interval=0.3,
            )
            await client.connect()
            napper = client.stub(Napper)
            assert await napper.nap(0) == "rested"
            first = client._proto
            assert first is not None
            await asyncio.sleep(1.5)  # several intervals with nothing but keepalive traffic
            assert await napper.nap(1.2) == "rested"  # four intervals long
            assert client._proto is first and not first.closed
            await client.close()
            assert first.closed_by is not None and first.closed_by.clean
    finally:
        await server.close(grace=0)
