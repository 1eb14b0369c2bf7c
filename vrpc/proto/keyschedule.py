"""The vrpc/1 key schedule: HKDF-SHA-384 with TLS-1.3-style labels, X25519, the transcript hash.

Theory of operation
-------------------
Everything is SHA-384 (48-byte secrets). ``expand_label`` is the RFC 8446 §7.1 HKDF-Expand-Label
layout with the label prefix ``"vrpc/1 "`` instead of ``"tls13 "``, so no vrpc secret can ever be
confused with a TLS secret derived from the same input (domain separation)::

    hs     = HKDF-Extract(salt=SHA-384("vrpc/1 hs"), ikm=X25519(eph_c, eph_s))
    s_fin  = ExpandLabel(hs, "s fin", "", 48)        c_fin = ExpandLabel(hs, "c fin", "", 48)
    ms     = HKDF-Extract(salt=ExpandLabel(hs, "derived", "", 48), ikm=0^48)
    c_ap   = ExpandLabel(ms, "c ap", TH_final, 48)   s_ap  = ExpandLabel(ms, "s ap", TH_final, 48)
    exp    = ExpandLabel(ms, "exp", TH_final, 48)
    key    = ExpandLabel(x_ap, "key", "", 32)        iv    = ExpandLabel(x_ap, "iv", "", 12)
    x_ap'  = ExpandLabel(x_ap, "traffic upd", "", 48)                     (KEY_UPDATE)

HKDF (RFC 5869) is computed with the standard library's ``hmac.digest``: every output here is at
most one SHA-384 block (48 bytes), so Expand is a single HMAC and this is several times faster than
constructing a ``cryptography`` HKDF object per label. ``tests/proto/test_handshake_vectors.py``
cross-checks it against ``cryptography``'s HKDF.

The module is pure: no I/O, no clock, no randomness (callers inject the ephemeral keys).
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from vrpc.exceptions import HandshakeError

__all__ = [
    "HASH_LEN",
    "LABEL_PREFIX",
    "X25519_SPKI_PREFIX",
    "Transcript",
    "application_secrets",
    "expand_label",
    "finished_keys",
    "finished_mac",
    "handshake_secret",
    "hkdf_extract",
    "traffic_key_iv",
    "update_secret",
    "x25519_shared",
    "x25519_spki",
]

HASH_LEN = 48
LABEL_PREFIX = b"vrpc/1 "
_HS_SALT = hashlib.sha384(b"vrpc/1 hs").digest()
_ZEROS = bytes(HASH_LEN)

# DER SubjectPublicKeyInfo for X25519 (RFC 8410 §4): SEQUENCE { SEQUENCE { OID 1.3.101.110 },
# BIT STRING (0 unused bits) } followed by the 32 raw key bytes. 44 bytes in total.
X25519_SPKI_PREFIX = bytes.fromhex("302a300506032b656e032100")


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 §2.2 Extract with SHA-384."""
    return hmac.digest(salt, ikm, "sha384")


def expand_label(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    """RFC 8446 §7.1 HKDF-Expand-Label with the ``"vrpc/1 "`` prefix (``length`` <= 48)."""
    full = LABEL_PREFIX + label.encode("ascii")
    if not 0 < length <= HASH_LEN or len(full) > 255 or len(context) > 255:
        raise ValueError("expand_label: length, label or context out of range")
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + bytes((len(context),)) + context
    # One block of RFC 5869 §2.3 Expand: T(1) = HMAC(PRK, info || 0x01).
    return hmac.digest(secret, info + b"\x01", "sha384")[:length]


def x25519_spki(public_raw: bytes) -> bytes:
    """The DER SPKI of a raw 32-byte X25519 public key (what the attestation's public_key holds)."""
    if len(public_raw) != 32:
        raise ValueError("X25519 public key must be 32 bytes")
    return X25519_SPKI_PREFIX + public_raw


def x25519_shared(private: X25519PrivateKey, peer_raw: bytes) -> bytes:
    """X25519 with the RFC 7748 §6.1 all-zero check (``cryptography`` raises; we abort)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_raw))
    except ValueError as exc:
        raise HandshakeError("key exchange failed (invalid peer key share)") from exc


def handshake_secret(shared: bytes) -> bytes:
    return hkdf_extract(_HS_SALT, shared)


def finished_keys(hs: bytes) -> tuple[bytes, bytes]:
    """(client finished key, server finished key)."""
    return expand_label(hs, "c fin", b"", HASH_LEN), expand_label(hs, "s fin", b"", HASH_LEN)


def finished_mac(key: bytes, transcript_hash: bytes) -> bytes:
    return hmac.digest(key, transcript_hash, "sha384")


def application_secrets(hs: bytes, transcript_hash: bytes) -> tuple[bytes, bytes, bytes]:
    """(c_ap, s_ap, exporter) from the handshake secret and the final transcript hash."""
    ms = hkdf_extract(expand_label(hs, "derived", b"", HASH_LEN), _ZEROS)
    return (
        expand_label(ms, "c ap", transcript_hash, HASH_LEN),
        expand_label(ms, "s ap", transcript_hash, HASH_LEN),
        expand_label(ms, "exp", transcript_hash, HASH_LEN),
    )


def traffic_key_iv(secret: bytes) -> tuple[bytes, bytes]:
    """AES-256-GCM key (32 B) and IV (12 B) of one direction."""
    return expand_label(secret, "key", b"", 32), expand_label(secret, "iv", b"", 12)


def update_secret(secret: bytes) -> bytes:
    """The next traffic secret of a direction after a KEY_UPDATE (RFC 8446 §7.2 shape)."""
    return expand_label(secret, "traffic upd", b"", HASH_LEN)


class Transcript:
    """Running SHA-384 over the exact wire bytes of the handshake, prefixed by a domain string.

    Nothing is re-encoded: callers feed the bytes as they were sent or received.
    """

    __slots__ = ("_h",)

    DOMAIN = b"vrpc/1 transcript"

    def __init__(self) -> None:
        self._h = hashlib.sha384(self.DOMAIN)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.copy().digest()
