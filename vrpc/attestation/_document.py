"""Parse and verify a Nitro attestation document: structure, certificate chain, COSE signature.

Pure functions: the verification time is an argument, nothing here reads a clock or a device.
The checks run cheapest first, and each failure raises the most specific
:class:`~vrpc.exceptions.AttestationError` subclass with what was expected and what was found:

1. size cap (16 KiB) — before any decoding;
2. CBOR structure: one COSE_Sign1 array (untagged as NSM emits it, or tag 18), no trailing bytes,
   no duplicate map keys;
3. headers: protected header exactly the canonical bytes of ``{1: -35}`` (ES384, ``a1 01 38
   22``), unprotected header empty, 96-byte ``r || s`` signature;
4. payload fields: every required field present, non-null, of the right type and size;
5. certificate chain: leaf (not a CA) → ``cabundle[N-1]`` … ``cabundle[1]`` → the *pinned* root
   (never ``cabundle[0]``, which is only the document's claim of which root it uses); a validated
   chain is cached by its exact certificate bytes and root until its earliest notAfter;
6. the document's timestamp lies within the leaf certificate's validity;
7. COSE signature over ``["Signature1", protected, b"", payload]`` built from the bytes exactly as
   received. Payloads come with definite- and indefinite-length maps; re-encoding would break the
   signature or, worse, verify something other than what was signed.

The chain runs before the signature so that the key used for the signature check is already known
to be vouched for by the root; see docs/attestation.md for the reasoning.
"""

from __future__ import annotations

import functools
import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import cbor2
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    VerificationError,
)
from cryptography.x509.verification import Policy as _X509Policy

from vrpc.attestation._roots import AWS_NITRO_ROOT, TrustRoot
from vrpc.exceptions import (
    CertificateExpired,
    ChainInvalid,
    LocalProtocolError,
    MalformedDocument,
    SignatureInvalid,
)

__all__ = ["MAX_DOCUMENT_SIZE", "Claims", "verify_document"]

_log = structlog.get_logger("vrpc.attestation")

#: Genuine documents are 4.5-7.5 KB; anything larger is refused before decoding.
MAX_DOCUMENT_SIZE = 16 * 1024

# The deepest genuine structure is COSE array -> payload bstr (decoded separately) -> map -> map.
_MAX_CBOR_DEPTH = 8

_ES384 = -35
# The canonical (RFC 8949 §4.2.1) encoding of {1: -35}, as every genuine document carries it. Other
# encodings decode to the same map but are different signed bytes: refuse them rather than give
# the document two spellings.
_CANONICAL_PROTECTED = b"\xa1\x01\x38\x22"
_SIGNATURE_SIZE = 96  # P-384: 48-byte r || 48-byte s (RFC 9053 §2.1)
_COSE_SIGN1_TAG = 18
_SHA384_SIZE = 48

# Sizes from the NSM API attestation spec. user_data / nonce: the spec says 512 bytes but genuine
# documents carry 1024 (newer NSM firmware), so 1024 is the bound for all three optional fields.
_MAX_CERT_SIZE = 1024
_MAX_OPTIONAL_SIZE = 1024
_MAX_MODULE_ID = 256
_MAX_PCRS = 32
_MAX_CABUNDLE = 8

_REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")
_KNOWN = frozenset(_REQUIRED + _OPTIONAL)


@dataclass(frozen=True)
class Claims:
    """What a verified attestation document says. Produced only by :func:`verify_document`."""

    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def timestamp(self) -> datetime:
        """The NSM's signing time (UTC)."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    @property
    def debug(self) -> bool:
        """True for a debug-mode enclave (PCR0 all zero). A missing PCR0 counts as debug too:
        a document that does not identify its image must not pass as a production one."""
        pcr0 = self.pcrs.get(0)
        return pcr0 is None or not any(pcr0)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _decode_exact(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item that spans all of ``data``."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, max_depth=_MAX_CBOR_DEPTH)
        item = decoder.decode()
    except Exception as exc:  # cbor2 raises several types on garbage; all mean "not CBOR"
        raise MalformedDocument(f"{what} is not well-formed CBOR ({exc})") from exc
    trailing = len(data) - stream.tell()
    if trailing:
        raise MalformedDocument(f"{what} has {trailing} trailing bytes after the CBOR item")
    return item


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python; CBOR true must not pass for 1.
    return type(value) is int


def _bytes_field(payload: Mapping[str, Any], name: str, low: int, high: int) -> bytes:
    value = payload[name]
    if type(value) is not bytes:
        raise MalformedDocument(f"{name}: expected a byte string, got {_kind(value)}")
    if not low <= len(value) <= high:
        raise MalformedDocument(f"{name}: expected {low}..{high} bytes, got {len(value)}")
    return value


def _optional_bytes(payload: Mapping[str, Any], name: str, low: int) -> bytes | None:
    if payload.get(name) is None:
        return None
    return _bytes_field(payload, name, low, _MAX_OPTIONAL_SIZE)


def _parse_envelope(document: bytes) -> tuple[bytes, bytes, bytes]:
    """Return (protected, payload, signature) bytes exactly as received."""
    if type(document) is not bytes:
        raise MalformedDocument(f"document: expected bytes, got {_kind(document)}")
    if len(document) > MAX_DOCUMENT_SIZE:
        raise MalformedDocument(
            f"document too large: {len(document)} bytes (limit {MAX_DOCUMENT_SIZE})"
        )
    top = _decode_exact(document, "document")
    if isinstance(top, cbor2.CBORTag):
        if top.tag != _COSE_SIGN1_TAG:
            raise MalformedDocument(f"expected COSE_Sign1 (tag 18 or untagged), got tag {top.tag}")
        top = top.value
    if not isinstance(top, Sequence) or isinstance(top, str | bytes) or len(top) != 4:
        shape = f"{len(top)}-element array" if isinstance(top, Sequence) else _kind(top)
        raise MalformedDocument(f"expected a 4-element COSE_Sign1 array, got {shape}")
    protected, unprotected, payload, signature = top
    if type(protected) is not bytes:
        raise MalformedDocument(f"protected header: expected a byte string, got {_kind(protected)}")
    header = _decode_exact(protected, "protected header")
    if not (
        isinstance(header, Mapping)
        and len(header) == 1
        and all(_is_int(k) and k == 1 and _is_int(v) and v == _ES384 for k, v in header.items())
    ):
        raise MalformedDocument(
            f"protected header: expected exactly {{1: -35}} (alg ES384), got {header!r}"
        )
    if protected != _CANONICAL_PROTECTED:
        raise MalformedDocument(
            f"protected header: expected the canonical encoding {_CANONICAL_PROTECTED.hex()} of "
            f"{{1: -35}}, got {protected.hex()}"
        )
    if not isinstance(unprotected, Mapping) or len(unprotected) != 0:
        raise MalformedDocument(f"unprotected header: expected an empty map, got {unprotected!r}")
    if type(payload) is not bytes:
        raise MalformedDocument(f"payload: expected a byte string, got {_kind(payload)}")
    if type(signature) is not bytes or len(signature) != _SIGNATURE_SIZE:
        found = f"{len(signature)} bytes" if type(signature) is bytes else _kind(signature)
        raise MalformedDocument(
            f"signature: expected {_SIGNATURE_SIZE} bytes (r || s), got {found}"
        )
    return protected, payload, signature


def _parse_payload(payload_bytes: bytes) -> Claims:
    payload = _decode_exact(payload_bytes, "payload")
    if not isinstance(payload, Mapping):
        raise MalformedDocument(f"payload: expected a map, got {_kind(payload)}")
    unknown = [k for k in payload if k not in _KNOWN]
    if unknown:
        # A field we do not understand is a meaning we cannot check: refuse rather than ignore.
        raise MalformedDocument(f"payload: unexpected keys {unknown!r}")
    for name in _REQUIRED:
        if payload.get(name) is None:
            state = "null" if name in payload else "missing"
            raise MalformedDocument(f"payload: required field {name} is {state}")

    module_id = payload["module_id"]
    if type(module_id) is not str or not 1 <= len(module_id) <= _MAX_MODULE_ID:
        raise MalformedDocument(
            f"module_id: expected a non-empty text string, got {_kind(module_id)}"
        )
    digest = payload["digest"]
    if digest != "SHA384" or type(digest) is not str:
        raise MalformedDocument(f"digest: expected 'SHA384', got {digest!r}")
    timestamp = payload["timestamp"]
    if not _is_int(timestamp) or not 0 < timestamp < 2**64:
        raise MalformedDocument(f"timestamp: expected a positive uint64 (ms), got {timestamp!r}")

    raw_pcrs = payload["pcrs"]
    if not isinstance(raw_pcrs, Mapping) or not 1 <= len(raw_pcrs) <= _MAX_PCRS:
        found = f"{len(raw_pcrs)} entries" if isinstance(raw_pcrs, Mapping) else _kind(raw_pcrs)
        raise MalformedDocument(f"pcrs: expected a map of 1..{_MAX_PCRS} entries, got {found}")
    pcrs: dict[int, bytes] = {}
    for index, value in raw_pcrs.items():
        if not _is_int(index) or not 0 <= index < _MAX_PCRS:
            raise MalformedDocument(f"pcrs: expected an index 0..31, got {index!r}")
        if type(value) is not bytes or len(value) != _SHA384_SIZE:
            found = f"{len(value)} bytes" if type(value) is bytes else _kind(value)
            raise MalformedDocument(f"PCR{index}: expected {_SHA384_SIZE} bytes, got {found}")
        pcrs[index] = value

    certificate = _bytes_field(payload, "certificate", 1, _MAX_CERT_SIZE)
    raw_bundle = payload["cabundle"]
    if (
        not isinstance(raw_bundle, Sequence)
        or isinstance(raw_bundle, str | bytes)
        or not 1 <= len(raw_bundle) <= _MAX_CABUNDLE
    ):
        raise MalformedDocument(
            f"cabundle: expected an array of 1..{_MAX_CABUNDLE} certificates, got {raw_bundle!r}"
            if not isinstance(raw_bundle, Sequence | bytes)
            else f"cabundle: expected an array of 1..{_MAX_CABUNDLE} certificates, "
            f"got {_kind(raw_bundle)} of length {len(raw_bundle)}"
        )
    cabundle = []
    for i, cert in enumerate(raw_bundle):
        if type(cert) is not bytes or not 1 <= len(cert) <= _MAX_CERT_SIZE:
            found = f"{len(cert)} bytes" if type(cert) is bytes else _kind(cert)
            raise MalformedDocument(
                f"cabundle[{i}]: expected 1..{_MAX_CERT_SIZE} bytes, got {found}"
            )
        cabundle.append(cert)

    return Claims(
        module_id=module_id,
        digest=digest,
        timestamp_ms=timestamp,
        # Read-only view: Claims is frozen and its PCRs must not be edited after verification.
        pcrs=MappingProxyType(dict(sorted(pcrs.items()))),
        certificate=certificate,
        cabundle=tuple(cabundle),
        public_key=_optional_bytes(payload, "public_key", 1),
        user_data=_optional_bytes(payload, "user_data", 0),
        nonce=_optional_bytes(payload, "nonce", 0),
    )


def _parse_cert(der: bytes) -> x509.Certificate:
    # cryptography only *warns* about some RFC 5280 violations (e.g. a non-positive serial);
    # a strict verifier refuses them, so those warnings are raised as errors here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        cert = x509.load_der_x509_certificate(der)
    # Some fields are parsed lazily; touching them now makes a malformed certificate fail here
    # rather than later, in the middle of the chain checks, with an unrelated exception.
    _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
    _ = cert.extensions
    cert.public_key()
    return cert


# The cabundle repeats across every document of an instance (its intermediates live for days),
# so CA certificates are parsed once per exact DER bytes; failures are not cached.
_parse_ca_cert = functools.lru_cache(maxsize=64)(_parse_cert)


def _load_cert(der: bytes, what: str, *, ca: bool) -> x509.Certificate:
    try:
        return _parse_ca_cert(der) if ca else _parse_cert(der)
    except Exception as exc:  # ValueError, InvalidVersion, UnsupportedAlgorithm, the warning
        # Whatever the parser raises on attacker-supplied bytes means "not a certificate".
        raise MalformedDocument(f"{what}: not a valid DER X.509 certificate ({exc})") from exc


def _check_validity(cert: x509.Certificate, what: str, now: datetime) -> None:
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not not_before <= now <= not_after:
        raise CertificateExpired(
            f"{what} ({cert.subject.rfc4514_string()}) is not valid at {now.isoformat()} "
            f"(valid from {not_before.isoformat()} to {not_after.isoformat()})"
        )


def _refuse_ca_leaf(
    _policy: _X509Policy, _cert: x509.Certificate, constraints: x509.BasicConstraints | None
) -> None:
    # A CA certificate can issue certificates: as a leaf it would let its key holder vouch for
    # keys the NSM never made. Genuine Nitro leaves carry basicConstraints CA=false.
    if constraints is not None and constraints.ca:
        raise ValueError("the leaf certificate is a CA (basicConstraints CA=true)")


def _refuse_cert_sign_leaf(
    _policy: _X509Policy, _cert: x509.Certificate, usage: x509.KeyUsage | None
) -> None:
    if usage is not None and usage.key_cert_sign:
        raise ValueError("the leaf certificate may sign certificates (keyUsage keyCertSign)")


# Nitro leaves lack SAN and AKI, so the end-entity policy starts from permit_all, then refuses a
# leaf that is a CA or may sign certificates. CA certificates keep the full WebPKI CA profile
# (basicConstraints, keyUsage, AKI on intermediates).
_EE_POLICY = (
    ExtensionPolicy.permit_all()
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _refuse_ca_leaf)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _refuse_cert_sign_leaf)
)


@dataclass(frozen=True)
class _ValidChain:
    """A chain that validated, and the window in which that result holds."""

    key: ec.EllipticCurvePublicKey
    leaf_not_before: datetime
    leaf_not_after: datetime
    valid_from: datetime  # the latest notBefore of every certificate involved
    valid_until: datetime  # the earliest notAfter of every certificate involved


#: How many validated chains are remembered (one per enclave leaf: leaves live ~3 hours).
CHAIN_CACHE_SIZE = 64
_chain_cache: OrderedDict[tuple[bytes, ...], _ValidChain] = OrderedDict()
_chain_cache_lock = threading.Lock()


def clear_chain_cache() -> None:
    """Forget every cached chain validation (for tests and measurements; the root is part of
    every key, so changing roots needs no clearing)."""
    with _chain_cache_lock:
        _chain_cache.clear()


def _validate_chain(claims: Claims, now: datetime, root: TrustRoot) -> _ValidChain:
    leaf = _load_cert(claims.certificate, "certificate", ca=False)
    bundle = [_load_cert(der, f"cabundle[{i}]", ca=True) for i, der in enumerate(claims.cabundle)]
    # Explicit validity checks first: they give a readable CertificateExpired naming the
    # certificate; the path validation below would also refuse, with a terser message.
    _check_validity(leaf, "leaf certificate", now)
    for i, cert in enumerate(bundle):
        _check_validity(cert, f"cabundle[{i}]", now)
    verifier = (
        PolicyBuilder()
        .store(root.store)
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        # cabundle[0] is the document's copy of the root: the anchor comes only from the Store.
        verifier.verify(leaf, bundle[1:])
    except (VerificationError, ValueError, UnsupportedAlgorithm) as exc:
        raise ChainInvalid(
            f"certificate chain does not reach the trusted root "
            f"(expected root sha256 {root.fingerprint}; {exc})"
        ) from exc
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise MalformedDocument(f"leaf key: expected an EC P-384 key, got {type(key).__name__}")
    involved = [leaf, *bundle, root.certificate]
    return _ValidChain(
        key=key,
        leaf_not_before=leaf.not_valid_before_utc,
        leaf_not_after=leaf.not_valid_after_utc,
        valid_from=max(c.not_valid_before_utc for c in involved),
        valid_until=min(c.not_valid_after_utc for c in involved),
    )


def _verify_chain(claims: Claims, now: datetime, root: TrustRoot) -> _ValidChain:
    """The validated chain for ``claims`` at ``now``, from the cache when that result holds.

    Path validation depends only on the certificates' bytes, the anchor and the time; inside the
    window where every certificate involved is valid, the time changes nothing, so a success is
    reused for the exact same bytes and root while ``now`` stays inside that window. Failures are
    never cached. docs/security.md gives the full argument.
    """
    cache_key = (root.fingerprint.encode(), claims.certificate, *claims.cabundle)
    with _chain_cache_lock:
        cached = _chain_cache.get(cache_key)
        if cached is not None:
            if cached.valid_from <= now <= cached.valid_until:
                _chain_cache.move_to_end(cache_key)
                return cached
            del _chain_cache[cache_key]
    chain = _validate_chain(claims, now, root)
    with _chain_cache_lock:
        _chain_cache[cache_key] = chain
        _chain_cache.move_to_end(cache_key)
        while len(_chain_cache) > CHAIN_CACHE_SIZE:
            _chain_cache.popitem(last=False)
    return chain


def _check_timestamp(claims: Claims, chain: _ValidChain) -> None:
    # The NSM signs with a key its leaf certificate vouches for only within that certificate's
    # validity; a document claiming another time is not one the certificate covers. Compared in
    # integer milliseconds: an attacker's timestamp may be far outside datetime's range.
    low = int(chain.leaf_not_before.timestamp()) * 1000
    high = int(chain.leaf_not_after.timestamp()) * 1000
    if not low <= claims.timestamp_ms <= high:
        raise CertificateExpired(
            f"document timestamp {claims.timestamp_ms} ms is outside its leaf certificate's "
            f"validity ({chain.leaf_not_before.isoformat()} to "
            f"{chain.leaf_not_after.isoformat()}, {low}..{high} ms)"
        )


def _verify_signature(
    key: ec.EllipticCurvePublicKey, protected: bytes, payload: bytes, signature: bytes
) -> None:
    # RFC 9052 §4.4 Sig_structure. Our own encoding of the wrapper is canonical; the two byte
    # strings inside are the received bytes unchanged.
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r = int.from_bytes(signature[:48], "big")
    s = int.from_bytes(signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise SignatureInvalid(
            "COSE_Sign1 signature does not verify with the leaf certificate's key"
        ) from None


_warned_roots: set[str] = set()


def verify_document(document: bytes, *, now: datetime, root: TrustRoot = AWS_NITRO_ROOT) -> Claims:
    """Check structure, chain (at ``now``) and signature; return the claims. No policy here.

    ``now`` must be timezone-aware. Raises a :class:`~vrpc.exceptions.AttestationError`
    subclass on any failure.
    """
    if now.tzinfo is None:
        raise LocalProtocolError("verify_document: now must be a timezone-aware datetime")
    if root.insecure and root.fingerprint not in _warned_roots:
        # Once per root per process: a warning on every handshake would drown the log.
        _warned_roots.add(root.fingerprint)
        _log.warning(
            "INSECURE test attestation root in use: documents are not from a Nitro enclave",
            root_fingerprint=root.fingerprint,
        )
    protected, payload, signature = _parse_envelope(document)
    claims = _parse_payload(payload)
    chain = _verify_chain(claims, now.astimezone(UTC), root)
    _check_timestamp(claims, chain)
    _verify_signature(chain.key, protected, payload, signature)
    return claims
