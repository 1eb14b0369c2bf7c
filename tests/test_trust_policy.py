"""Trust policy fails closed through the public API: a policy that identifies no enclave image, a
debug allowance without its opt-in, or a weakly pinned mutual verifier is refused before any
session runs; over a real unix socket nothing reaches the server's handlers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import vrpc
from services.echo import Echo, EchoImpl
from vrpc._verify import handshake_verifier
from vrpc.attestation import DEFAULT_TEST_PCRS
from vrpc.exceptions import PolicyViolation

WEAK_PINS = [
    {1: DEFAULT_TEST_PCRS[1]},
    {3: DEFAULT_TEST_PCRS[3]},
    {3: DEFAULT_TEST_PCRS[3], 4: DEFAULT_TEST_PCRS[4]},
]
WHY = r"PCR3/PCR4 are chosen by the parent instance; PCR1 is shared by every image"


def test_the_test_attesters_policy_pins_a_real_image_pcr(
    attester: vrpc.InsecureTestAttester,
) -> None:
    policy = attester.policy()
    assert policy.pcrs[0] == DEFAULT_TEST_PCRS[0] and any(policy.pcrs[0])
    handshake_verifier(vrpc.Verifier(policy, attester.trust_root()))


@pytest.mark.parametrize("pins", WEAK_PINS)
def test_prod_client_refuses_a_policy_without_an_image_pin(pins: dict[int, bytes]) -> None:
    with pytest.raises(PolicyViolation, match=WHY):
        vrpc.connect("unix:///nonexistent.sock", policy=vrpc.Policy(pcrs=pins))


def test_prod_client_refuses_allow_debug_without_the_opt_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VRPC_ALLOW_DEBUG_ENCLAVE", raising=False)
    debug = vrpc.Policy(pcrs={0: bytes(48)}, allow_debug=True)
    with pytest.raises(PolicyViolation, match="allow_debug=True refused in prod mode"):
        vrpc.connect("unix:///nonexistent.sock", policy=debug)
    monkeypatch.setenv("VRPC_ALLOW_DEBUG_ENCLAVE", "1")
    vrpc.connect("unix:///nonexistent.sock", policy=debug)  # the loud opt-in: accepted


@pytest.mark.parametrize("pins", [{}, *WEAK_PINS])
def test_mutual_verifier_without_an_image_pin_is_refused_by_the_server(
    attester: vrpc.InsecureTestAttester, pins: dict[int, bytes]
) -> None:
    weak = vrpc.Verifier(vrpc.Policy(pcrs=pins), attester.trust_root())
    with pytest.raises(PolicyViolation, match="pin PCR0, PCR2 or PCR8"):
        vrpc.Server([EchoImpl()], attester=attester, mutual_verifier=weak)
    # The production root too (and the AWS root's debug rule: the opt-in).
    with pytest.raises(PolicyViolation, match="pin PCR0, PCR2 or PCR8"):
        vrpc.Server([EchoImpl()], attester=attester, mutual_verifier=vrpc.Verifier(weak.policy))


def test_prod_mutual_verifier_allowing_debug_needs_the_opt_in(
    attester: vrpc.InsecureTestAttester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VRPC_ALLOW_DEBUG_ENCLAVE", raising=False)
    debug = vrpc.Verifier(vrpc.Policy(pcrs={0: bytes(48)}, allow_debug=True))
    with pytest.raises(PolicyViolation, match="allow_debug=True refused in prod mode"):
        vrpc.Server([EchoImpl()], attester=attester, mutual_verifier=debug)


async def test_weakly_pinned_client_is_refused_before_connecting_over_unix(
    attester: vrpc.InsecureTestAttester,
    uri_on: Callable[..., str],
    tmp_path: Any,
    server_at: Callable[..., Any],
) -> None:
    # Under the test root too: the client is refused when it is built, so no connection is made
    # and no call runs; an honest client on the same server still works.
    uri = uri_on("unix", tmp_path)
    async with server_at(uri, [EchoImpl()]) as server:
        with pytest.raises(PolicyViolation, match=WHY):
            vrpc.connect(
                uri, policy=vrpc.Policy(pcrs={3: DEFAULT_TEST_PCRS[3]}), root=attester.trust_root()
            )
        assert server.connection_count == 0
        async with vrpc.connect(
            uri, policy=attester.policy(), root=attester.trust_root()
        ) as honest:
            assert await honest.stub(Echo).echo(b"still served") == b"still served"


async def test_debug_enclave_over_unix_needs_matching_pins(
    uri_on: Callable[..., str], tmp_path: Any, insecure_env: None
) -> None:
    # A debug-mode enclave (PCR0-2 zero) against a client pinning the real image: refused.
    debug = vrpc.InsecureTestAttester(seed=b"trust-policy debug", debug=True)
    uri = uri_on("unix", tmp_path)
    server = vrpc.Server([EchoImpl()], attester=debug)
    await server.start(uri)
    try:
        image = vrpc.Policy(pcrs={0: DEFAULT_TEST_PCRS[0]})
        with pytest.raises(vrpc.AttestationError, match=r"PCR0 mismatch.*debug-mode enclave"):
            async with vrpc.connect(uri, policy=image, root=debug.trust_root(), retries=0):
                pass
        async with vrpc.connect(uri, policy=debug.policy(), root=debug.trust_root()) as ok:
            assert await ok.stub(Echo).echo(b"debug allowed") == b"debug allowed"
    finally:
        await server.close(grace=0)


def test_the_handshake_adapter_checks_the_policy_too(attester: vrpc.InsecureTestAttester) -> None:
    weak = vrpc.Verifier(vrpc.Policy(pcrs={4: DEFAULT_TEST_PCRS[4]}), attester.trust_root())
    with pytest.raises(PolicyViolation, match=WHY):
        handshake_verifier(weak)
