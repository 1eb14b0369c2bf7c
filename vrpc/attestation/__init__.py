"""Nitro attestation: verify documents, apply a policy, talk to /dev/nsm, and (for tests and
development only) produce Nitro-shaped documents under an INSECURE test root.

Production trusts only the pinned AWS Nitro root (:data:`AWS_NITRO_ROOT`). See
docs/attestation.md for the trust model and the order of the checks.
"""

from __future__ import annotations

from vrpc.attestation._document import MAX_DOCUMENT_SIZE, Claims, verify_document
from vrpc.attestation._insecure import DEFAULT_TEST_PCRS, InsecureTestAttester
from vrpc.attestation._nsm import Attester, NsmAttester, NsmDevice
from vrpc.attestation._policy import ALLOW_DEBUG_ENV_VAR, IMAGE_PCRS, Policy, check_bindings
from vrpc.attestation._roots import (
    AWS_NITRO_ROOT,
    AWS_NITRO_ROOT_FINGERPRINT,
    INSECURE_ENV_VAR,
    TrustRoot,
)
from vrpc.attestation._verifier import Verifier

__all__ = [
    "ALLOW_DEBUG_ENV_VAR",
    "AWS_NITRO_ROOT",
    "AWS_NITRO_ROOT_FINGERPRINT",
    "DEFAULT_TEST_PCRS",
    "IMAGE_PCRS",
    "INSECURE_ENV_VAR",
    "MAX_DOCUMENT_SIZE",
    "Attester",
    "Claims",
    "InsecureTestAttester",
    "NsmAttester",
    "NsmDevice",
    "Policy",
    "TrustRoot",
    "Verifier",
    "check_bindings",
    "verify_document",
]
