"""The bridge between the attestation library and the sans-IO handshake.

The handshake core passes time as a float (it never reads a clock) and asks a plain callable to
verify the peer's document; ``vrpc.attestation.Verifier`` wants a timezone-aware datetime. Both
shells (the client checking the enclave, a server checking attested clients) use this one adapter,
so it is also where a policy is checked before it decides who a session talks to.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from vrpc.attestation import Claims, Verifier

if TYPE_CHECKING:
    from vrpc.audit import AuditTrail

__all__ = ["HandshakeVerify", "handshake_verifier"]

HandshakeVerify = Callable[..., Claims]


def handshake_verifier(
    verifier: Verifier, *, audit: AuditTrail | None = None, peer: str = ""
) -> HandshakeVerify:
    """``verify(document, *, nonce, public_key, user_data, now)`` for the handshake; with
    ``audit``, every verdict is also recorded there (``peer`` names the address in the entry).

    Raises PolicyViolation at once (fail closed) when the verifier's policy does not pin an
    enclave image (:meth:`Policy.require_pins`), under a test root too: a policy that accepts any
    image is as wrong in development as in production. Debug enclaves need the environment opt-in
    only under the production root; a test root has already needed its own two opt-ins.
    """
    verifier.policy.require_pins(prod=not verifier.root.insecure)

    def verify(
        document: bytes, *, nonce: bytes, public_key: bytes, user_data: bytes, now: float
    ) -> Claims:
        return verifier.verify(
            document,
            now=datetime.fromtimestamp(now, UTC),
            nonce=nonce,
            public_key=public_key,
            user_data=user_data,
        )

    if audit is not None:
        return audit.wrap(verify, verifier, peer=peer)
    return verify
