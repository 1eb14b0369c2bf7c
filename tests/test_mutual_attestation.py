"""Mutual attestation through the public API (enclave to enclave): the initiator presents its own
document, the responder verifies it with its own policy, and handlers read the peer's claims."""

from __future__ import annotations

from collections.abc import Callable

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


def trusting(initiator: vrpc.InsecureTestAttester) -> vrpc.Verifier:
    """The responder's own policy for initiators (here: exactly that enclave's PCRs)."""
    return vrpc.Verifier(initiator.policy(), initiator.trust_root())


async def test_handler_reads_the_verified_claims_of_an_attested_client(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    uri = new_uri()
    initiator = vrpc.InsecureTestAttester(seed=b"initiator enclave", pcrs={0: b"\x42" * 48})
    server = vrpc.Server([WhoAmIImpl()], attester=attester, mutual_verifier=trusting(initiator))
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
    server = vrpc.Server([WhoAmIImpl()], attester=attester, mutual_verifier=trusting(expected))
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
