"""Trust anchors for attestation documents.

The production anchor is the AWS Nitro Enclaves Root-G1 certificate, embedded here and pinned by the
SHA-256 of its DER encoding. The fingerprint AWS quotes in its documentation
(``8cf60e2b…faff7c``) is the hash of the *zip file* the certificate ships in, not of the
certificate; the pin below is the certificate's own.

The only other anchor vrpc accepts is a locally generated test root. Every way of building one
(:meth:`TrustRoot.insecure_test`, or ``TrustRoot(..., insecure=True)`` directly) needs both the
environment variable ``VRPC_INSECURE_TEST_ATTESTATION=1`` and the INSECURE labels in the
certificate's subject.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Store

from vrpc.exceptions import PolicyViolation

__all__ = [
    "AWS_NITRO_ROOT",
    "AWS_NITRO_ROOT_FINGERPRINT",
    "AWS_NITRO_ROOT_PEM",
    "INSECURE_ENV_VAR",
    "INSECURE_ROOT_CN",
    "INSECURE_ROOT_ORG",
    "TrustRoot",
]

#: SHA-256 of the DER of ``CN=aws.nitro-enclaves, OU=AWS, O=Amazon, C=US`` (valid 2019-2049).
AWS_NITRO_ROOT_FINGERPRINT = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"

# A public certificate: embedding it is what makes the production trust decision local and fixed.
AWS_NITRO_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
"""

#: The environment variable that must be exactly "1" before a test root can be trusted.
INSECURE_ENV_VAR = "VRPC_INSECURE_TEST_ATTESTATION"
#: Labels every test root carries, so it can never be mistaken for a real anchor.
INSECURE_ROOT_CN = "INSECURE TEST ATTESTATION ROOT - NEVER TRUST IN PROD"
INSECURE_ROOT_ORG = "INSECURE-TEST-ONLY"


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class TrustRoot:
    """A certificate that attestation chains must end in.

    Construct it as :data:`AWS_NITRO_ROOT` (production) or with :meth:`insecure_test`. A
    non-insecure ``TrustRoot`` whose certificate is not the pinned AWS root cannot be created, and
    an insecure one cannot be created without both test-root opt-ins, whichever constructor runs.
    """

    certificate: x509.Certificate
    fingerprint: str
    insecure: bool = False
    # The Store is immutable and costs a parse; building it once per root keeps verification fast.
    store: Store = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        actual = _fingerprint(self.certificate)
        if not hmac.compare_digest(actual, self.fingerprint.lower()):
            raise PolicyViolation(
                f"trust root fingerprint mismatch (expected {self.fingerprint}, got {actual})"
            )
        if not self.insecure and not hmac.compare_digest(actual, AWS_NITRO_ROOT_FINGERPRINT):
            raise PolicyViolation(
                "only the pinned AWS Nitro root can be a production trust root "
                f"(expected {AWS_NITRO_ROOT_FINGERPRINT}, got {actual}); "
                "test roots go through TrustRoot.insecure_test"
            )
        if self.insecure:
            # Checked here, not only in insecure_test, so no constructor skips the two opt-ins.
            _require_insecure_opt_ins(self.certificate)
        object.__setattr__(self, "store", Store([self.certificate]))

    @classmethod
    def insecure_test(cls, pem: bytes) -> TrustRoot:
        """Trust a locally generated test root: needs ``VRPC_INSECURE_TEST_ATTESTATION=1``.

        The certificate must carry the INSECURE labels in its subject, so a real CA can never be
        smuggled in through this door.
        """
        _require_insecure_env()
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise PolicyViolation(f"test root is not a PEM certificate: {exc}") from None
        return cls(certificate=cert, fingerprint=_fingerprint(cert), insecure=True)


def _require_insecure_env() -> None:
    if os.environ.get(INSECURE_ENV_VAR) != "1":
        raise PolicyViolation(
            "refusing to trust an insecure test attestation root: "
            f"set {INSECURE_ENV_VAR}=1 in the environment to allow it (never in production)"
        )


def _require_insecure_opt_ins(cert: x509.Certificate) -> None:
    """Both documented opt-ins: the environment variable and the INSECURE subject labels."""
    _require_insecure_env()
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if cns != [INSECURE_ROOT_CN] or orgs != [INSECURE_ROOT_ORG]:
        raise PolicyViolation(
            f"test root subject must be CN={INSECURE_ROOT_CN!r}, O={INSECURE_ROOT_ORG!r} "
            f"(got {cert.subject.rfc4514_string()!r})"
        )


def _load_aws_root() -> TrustRoot:
    cert = x509.load_pem_x509_certificate(AWS_NITRO_ROOT_PEM)
    # Checked at import: a corrupted constant must stop the program, not weaken verification.
    return TrustRoot(certificate=cert, fingerprint=AWS_NITRO_ROOT_FINGERPRINT, insecure=False)


AWS_NITRO_ROOT: TrustRoot = _load_aws_root()
