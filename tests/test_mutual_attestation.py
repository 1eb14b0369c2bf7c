"""Mutual attestation through the public API (enclave to enclave): the initiator presents its own
document, the responder verifies it with its own policy, and handlers read the peer's claims."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

import vrpc


class WhoAmI(vrpc.Service, name="whoami.v1"):
    @vrpc.rpc
    async def peer_pcr0(self) -> bytes:
        raise NotImplementedError


class WhoAmIImpl(WhoAmI):
    async def peer_pcr0(self) -> bytes:
        claims = vrpc.current_call().peer.claims
        assert claims is not None
        return bytes(claims.pcrs[0])


def peer_verifier(
    trusted: vrpc.InsecureTestAttester,
) -> Callable[..., Any]:
    """The responder's check of initiators: its own policy and root, in the handshake's terms."""
    verifier = vrpc.Verifier(trusted.policy(), trusted.trust_root())

    def verify(
        document: bytes, *, nonce: bytes, public_key: bytes, user_data: bytes, now: float
    ) -> vrpc.Claims:
        return verifier.verify(
            document,
            now=datetime.fromtimestamp(now, UTC),
            nonce=nonce,
            public_key=public_key,
            user_data=user_data,
        )

    return verify


async def test_handler_reads_the_verified_claims_of_an_attested_client(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    uri = new_uri()
    initiator = vrpc.InsecureTestAttester(seed=b"initiator enclave", pcrs={0: b"\x42" * 48})
    server = vrpc.Server(
        [WhoAmIImpl()], attester=attester, mutual_verifier=peer_verifier(initiator)
    )
    await server.start(uri)
    try:
        async with vrpc.connect(
            uri, policy=attester.policy(), root=attester.trust_root(), mutual_attester=initiator
        ) as client:
            assert await client.stub(WhoAmI).peer_pcr0() == b"\x42" * 48
    finally:
        await server.close(grace=0)


async def test_unattested_or_wrongly_attested_clients_are_refused(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    uri = new_uri()
    expected = vrpc.InsecureTestAttester(seed=b"initiator enclave", pcrs={0: b"\x42" * 48})
    impostor = vrpc.InsecureTestAttester(seed=b"initiator enclave", pcrs={0: b"\x13" * 48})
    server = vrpc.Server([WhoAmIImpl()], attester=attester, mutual_verifier=peer_verifier(expected))
    await server.start(uri)
    try:
        # No document at all: the server refuses in the handshake and says why (an alert).
        with pytest.raises(vrpc.HandshakeError, match="mutual_refused"):
            async with vrpc.connect(uri, policy=attester.policy(), root=attester.trust_root()):
                pass
        # A genuine-looking document with the wrong PCR0: the client has finished its side of
        # the handshake, the server checks the document, refuses and closes; no call runs.
        with pytest.raises(vrpc.RpcError) as info:
            async with vrpc.connect(
                uri,
                policy=attester.policy(),
                root=attester.trust_root(),
                mutual_attester=impostor,
                retries=0,
            ) as client:
                await client.stub(WhoAmI).peer_pcr0()
        assert info.value.status is vrpc.Status.UNAVAILABLE
        assert server.metrics.snapshot() == {}  # the handler never ran
        async with vrpc.connect(
            uri, policy=attester.policy(), root=attester.trust_root(), mutual_attester=expected
        ) as client:
            assert await client.stub(WhoAmI).peer_pcr0() == b"\x42" * 48
    finally:
        await server.close(grace=0)
