"""A software attester for machines without Nitro hardware. INSECURE: tests and development only.

It emits documents shaped exactly like the NSM's (untagged COSE_Sign1, ES384, the same payload
map, an indefinite-length payload map as current NSM firmware writes, a P-384 chain root → two
intermediates → leaf without SAN/AKI) so that the *same* verifier code path runs in tests, in
development and in production. Only the trust anchor and the PCR values differ:

* the root is generated here, labelled ``CN=INSECURE TEST ATTESTATION ROOT - NEVER TRUST IN PROD,
  O=INSECURE-TEST-ONLY``, and trusting it needs both :meth:`TrustRoot.insecure_test` in code and
  ``VRPC_INSECURE_TEST_ATTESTATION=1`` in the environment;
* the default PCRs are ``SHA384(b"TEST-PCR<i>")``, which no real image can produce;
* construction refuses to run where ``/dev/nsm`` exists, so an enclave cannot fall back to it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import cbor2
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from vrpc.attestation._policy import Policy
from vrpc.attestation._roots import INSECURE_ROOT_CN, INSECURE_ROOT_ORG, TrustRoot
from vrpc.exceptions import NsmError, PolicyViolation

__all__ = ["DEFAULT_TEST_PCRS", "InsecureTestAttester"]

_log = structlog.get_logger("vrpc.attestation")

#: PCR i = SHA-384(b"TEST-PCR<i>") for the indices a real document usually sets.
DEFAULT_TEST_PCRS: Mapping[int, bytes] = {
    i: hashlib.sha384(b"TEST-PCR%d" % i).digest() for i in (0, 1, 2, 3, 4, 8)
}

# secp384r1 group order (SEC 2 §2.5.1); seeded keys are reduced into [1, n-1].
_P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)
_PROTECTED = cbor2.dumps({1: -35})  # b"\xa1\x01\x38\x22", ES384, as the NSM writes it
_CA_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
_CA_NOT_AFTER = datetime(2100, 1, 1, tzinfo=UTC)
_LEAF_LIFETIME = timedelta(hours=3)  # like the NSM's leaf certificates
_LEAF_RENEW_BEFORE = timedelta(hours=1)
_MAX_FIELD = 1024


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "ZZ"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, INSECURE_ROOT_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


class InsecureTestAttester:
    """Nitro-shaped documents signed by a locally generated chain. Never use in production.

    With ``seed`` the root and intermediate keys and certificates are deterministic, so another
    process can rebuild the same root (``InsecureTestAttester(seed=...).root_pem``). The leaf is
    made on demand, valid three hours like the NSM's, and renewed an hour before it expires.
    """

    insecure = True  # documents under a test root: servers using it run in dev-insecure mode
    # Signing takes microseconds and touches no device: the shells call it on the event loop
    # instead of handing it to a thread (an attester without this flag always runs in a thread).
    attests_inline = True

    def __init__(
        self,
        *,
        pcrs: Mapping[int, bytes] | None = None,
        debug: bool = False,
        seed: bytes | None = None,
        nsm_path: str = "/dev/nsm",
    ) -> None:
        if os.path.exists(nsm_path):
            raise PolicyViolation(
                f"refusing to create an insecure test attester: {nsm_path} exists, "
                "so this is a real enclave and must attest with NsmAttester"
            )
        # Warned at the first document, not here: a client that builds an attester only to
        # learn its root (to trust a dev server) attests nothing.
        self._warned = False
        chosen = dict(DEFAULT_TEST_PCRS if pcrs is None else pcrs)
        if debug:
            chosen.update({i: bytes(48) for i in (0, 1, 2)})
        for index, value in chosen.items():
            if type(index) is not int or not 0 <= index < 32 or len(value) != 48:
                raise ValueError(f"PCR{index}: expected index 0..31 and 48 bytes")
        self.pcrs: Mapping[int, bytes] = dict(sorted(chosen.items()))
        self.debug = debug
        self._seed = seed
        self.module_id = "i-0000000000000000-enc" + (
            hashlib.sha256(b"module" + seed).hexdigest()[:16] if seed else secrets.token_hex(8)
        )
        self._root_key = self._key(b"root")
        self._mid_keys = (self._key(b"intermediate-1"), self._key(b"intermediate-2"))
        self._root = self._ca_cert(
            _name(INSECURE_ROOT_CN), self._root_key, _name(INSECURE_ROOT_CN), self._root_key, None
        )
        mid1 = self._ca_cert(
            _name("INSECURE TEST regional intermediate"),
            self._mid_keys[0],
            self._root.subject,
            self._root_key,
            1,
        )
        mid2 = self._ca_cert(
            _name("INSECURE TEST zonal intermediate"),
            self._mid_keys[1],
            mid1.subject,
            self._mid_keys[0],
            0,
        )
        self._issuer = mid2
        self._cabundle = tuple(c.public_bytes(Encoding.DER) for c in (self._root, mid1, mid2))
        self.root_pem: bytes = self._root.public_bytes(Encoding.PEM)
        self._lock = threading.Lock()
        self._leaf: tuple[ec.EllipticCurvePrivateKey, bytes, datetime] | None = None

    # -- chain ----------------------------------------------------------------------------

    def _key(self, label: bytes) -> ec.EllipticCurvePrivateKey:
        if self._seed is None:
            return ec.generate_private_key(ec.SECP384R1())
        digest = hashlib.sha512(b"vrpc insecure test key\0" + label + b"\0" + self._seed).digest()
        scalar = int.from_bytes(digest, "big") % (_P384_ORDER - 1) + 1
        return ec.derive_private_key(scalar, ec.SECP384R1())

    def _serial(self, label: bytes) -> int:
        if self._seed is None:
            return x509.random_serial_number()
        digest = hashlib.sha256(b"vrpc insecure test serial\0" + label + self._seed).digest()
        return int.from_bytes(digest[:16], "big") >> 1 or 1

    def _ca_cert(
        self,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        issuer_key: ec.EllipticCurvePrivateKey,
        path_length: int | None,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(self._serial(subject.rfc4514_string().encode()))
            .not_valid_before(_CA_NOT_BEFORE)
            .not_valid_after(_CA_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if issuer_key is not key:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        # Deterministic ECDSA (RFC 6979) makes a seeded chain byte-identical across processes.
        return builder.sign(issuer_key, hashes.SHA384(), ecdsa_deterministic=self._seed is not None)

    def _current_leaf(self, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
        with self._lock:
            if self._leaf is None or self._leaf[2] - now < _LEAF_RENEW_BEFORE:
                key = ec.generate_private_key(ec.SECP384R1())
                not_before = now - timedelta(minutes=1)
                cert = (
                    x509.CertificateBuilder()
                    .subject_name(_name(f"{self.module_id}.insecure-test"))
                    .issuer_name(self._issuer.subject)
                    .public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(not_before)
                    .not_valid_after(now + _LEAF_LIFETIME)
                    # Like the NSM's leaf: basicConstraints and keyUsage, no SAN, no AKI.
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                    .add_extension(
                        x509.KeyUsage(
                            digital_signature=True,
                            content_commitment=True,
                            key_encipherment=False,
                            data_encipherment=False,
                            key_agreement=False,
                            key_cert_sign=False,
                            crl_sign=False,
                            encipher_only=False,
                            decipher_only=False,
                        ),
                        False,
                    )
                    .sign(self._mid_keys[1], hashes.SHA384())
                )
                self._leaf = (key, cert.public_bytes(Encoding.DER), cert.not_valid_after_utc)
            return self._leaf[0], self._leaf[1]

    # -- Attester -------------------------------------------------------------------------

    def attest(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A signed document carrying the given fields (None becomes CBOR null, as on NSM)."""
        for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
            if value is not None and len(value) > _MAX_FIELD:
                raise NsmError(f"NSM refused Attestation: InvalidArgument ({name} too long)")
        if not self._warned:
            self._warned = True
            _log.warning(
                "INSECURE test attester in use: its documents prove nothing about the code running",
                debug=self.debug,
                module_id=self.module_id,
            )
        timestamp_ms = time.time_ns() // 1_000_000
        now = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)
        key, leaf_der = self._current_leaf(now)
        fields: tuple[tuple[str, object], ...] = (
            ("module_id", self.module_id),
            ("digest", "SHA384"),
            ("timestamp", timestamp_ms),
            ("pcrs", dict(self.pcrs)),
            ("certificate", leaf_der),
            ("cabundle", list(self._cabundle)),
            ("public_key", public_key),
            ("user_data", user_data),
            ("nonce", nonce),
        )
        # Indefinite-length map (0xbf ... 0xff) as current NSM firmware writes it; cbor2 only
        # writes definite lengths, so the map is framed by hand.
        payload = b"".join(
            [b"\xbf", *(cbor2.dumps(k) + cbor2.dumps(v) for k, v in fields), b"\xff"]
        )
        to_be_signed = cbor2.dumps(["Signature1", _PROTECTED, b"", payload])
        r, s = decode_dss_signature(key.sign(to_be_signed, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        return cbor2.dumps([_PROTECTED, {}, payload, signature])

    # -- helpers for the verifying side ---------------------------------------------------

    def trust_root(self) -> TrustRoot:
        """This attester's root as a TrustRoot (needs VRPC_INSECURE_TEST_ATTESTATION=1)."""
        return TrustRoot.insecure_test(self.root_pem)

    def policy(self) -> Policy:
        """A policy pinning this attester's PCR0-2 (allowing debug mode if it is in debug)."""
        return Policy(
            pcrs={i: self.pcrs[i] for i in (0, 1, 2) if i in self.pcrs}, allow_debug=self.debug
        )
