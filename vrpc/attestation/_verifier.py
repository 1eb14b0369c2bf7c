"""The one-call verifier: document, then policy, then bindings."""

from __future__ import annotations

from datetime import datetime

from vrpc.attestation._document import Claims, verify_document
from vrpc.attestation._policy import Policy, check_bindings
from vrpc.attestation._roots import AWS_NITRO_ROOT, TrustRoot

__all__ = ["Verifier"]


class Verifier:
    """Verify attestation documents against one policy and one trust root.

    ``verify`` runs, in order: :func:`verify_document` (size, structure, headers, payload,
    chain at ``now``, signature), :meth:`Policy.check` (PCRs, debug mode, module id, freshness),
    then :func:`check_bindings`. Any failure raises an AttestationError subclass; nothing is
    returned for a document that fails any step. The first verification against each insecure
    root in a process logs a warning.
    """

    def __init__(self, policy: Policy, root: TrustRoot = AWS_NITRO_ROOT) -> None:
        self.policy = policy
        self.root = root

    def verify(
        self,
        document: bytes,
        *,
        now: datetime,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
        user_data: bytes | None = None,
    ) -> Claims:
        claims = verify_document(document, now=now, root=self.root)
        self.policy.check(claims, now=now)
        check_bindings(claims, nonce=nonce, public_key=public_key, user_data=user_data)
        return claims

    def __repr__(self) -> str:
        return f"Verifier(policy={self.policy!r}, root={self.root.fingerprint[:16]}…)"
