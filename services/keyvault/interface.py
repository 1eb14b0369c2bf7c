"""The ``keyvault.v1`` interface: what a host may ask the enclave's key vault to do.

This module is the wire contract and is imported by hosts, so it depends on vrpc's service
declarations only (no cryptography, no KMS client). The implementation lives in
``services.keyvault.impl`` and runs inside the enclave.

Key material never leaves the enclave in the clear: the only way out is :meth:`KeyVault.seal`,
which returns the whole key store encrypted under a data key that only an attested enclave can
obtain from AWS KMS (see ``services.keyvault.sealing``).

Formats returned to callers:

* ``public_key``: SubjectPublicKeyInfo, DER.
* ``sign``: Ed25519 -> 64 raw bytes (RFC 8032); ECDSA P-256 -> DER ``Ecdsa-Sig-Value`` over
  SHA-256 of the message (what OpenSSL, ``cryptography`` and JCA verify directly).
* ``encrypt``: ``0x01 || nonce (12) || AES-256-GCM ciphertext || tag (16)``; the associated data
  is authenticated, not stored: ``decrypt`` needs the same bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from vrpc.service import Service, rpc

__all__ = [
    "MAX_KEYS",
    "MAX_LABEL_CHARS",
    "MAX_MESSAGE_BYTES",
    "MAX_SEALED_BYTES",
    "KeyInfo",
    "KeyType",
    "KeyVault",
    "sealed_generation",
]

#: Largest ``message`` / ``plaintext`` / ``ciphertext`` / ``associated_data`` accepted (1 MiB).
MAX_MESSAGE_BYTES = 1 << 20
#: Largest label, in characters.
MAX_LABEL_CHARS = 128
#: Most keys one vault holds; a bound on enclave memory and on the sealed blob's size.
MAX_KEYS = 10_000
#: Largest sealed blob ``unseal`` accepts.
MAX_SEALED_BYTES = 16 << 20


class KeyType(enum.StrEnum):
    """Kinds of key the vault creates."""

    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"
    AES_256_GCM = "aes-256-gcm"

    @property
    def signs(self) -> bool:
        return self is not KeyType.AES_256_GCM

    @property
    def encrypts(self) -> bool:
        return self is KeyType.AES_256_GCM


def sealed_generation(sealed: bytes) -> int:
    """The generation written in a sealed blob's header (``services.keyvault.sealing``), for
    hosts that record the latest one; ``ValueError`` when the bytes are not a sealed blob.

    The header is authenticated only when the enclave unseals the blob: a host learns here what
    the blob claims, the enclave refuses it later if the claim is false."""
    if len(sealed) < 13 or sealed[:5] != b"VRKV\x02":
        raise ValueError("not a version 2 keyvault sealed blob")
    generation: int = struct.unpack_from(">Q", sealed, 5)[0]
    return generation


@dataclasses.dataclass(frozen=True, slots=True)
class KeyInfo:
    """Public facts about one key (never its material)."""

    key_id: str
    key_type: KeyType
    label: str | None
    created_ms: int  # Unix time in milliseconds, enclave clock


class KeyVault(Service, name="keyvault.v1"):
    """Keys created and used inside the enclave.

    Errors (``vrpc.exceptions.RpcError``): an unknown ``key_id`` is ``NOT_FOUND``; a key of the
    wrong type for the operation is ``FAILED_PRECONDITION``; an argument over its size limit or
    malformed is ``INVALID_ARGUMENT``; a full vault is ``RESOURCE_EXHAUSTED``. ``details`` is a
    dict naming the offending ``param`` (never carrying payload bytes).
    """

    @rpc
    async def create_key(self, key_type: KeyType, label: str | None = None) -> KeyInfo:
        """Generate a new key inside the enclave and return its public facts."""
        raise NotImplementedError

    @rpc(idempotent=True)
    async def list_keys(self) -> list[KeyInfo]:
        """Every key, oldest first."""
        raise NotImplementedError

    @rpc
    async def delete_key(self, key_id: str) -> None:
        """Forget a key. Sealed blobs made earlier still contain it."""
        raise NotImplementedError

    @rpc(idempotent=True)
    async def public_key(self, key_id: str) -> bytes:
        """SubjectPublicKeyInfo (DER) of a signing key."""
        raise NotImplementedError

    @rpc(idempotent=True)
    async def sign(self, key_id: str, message: bytes) -> bytes:
        """Sign ``message`` with a signing key (format in the module docstring)."""
        raise NotImplementedError

    @rpc(idempotent=True)
    async def verify(self, key_id: str, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is valid for ``message``; malformed signatures are False."""
        raise NotImplementedError

    @rpc(idempotent=True)
    async def encrypt(self, key_id: str, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """AES-256-GCM with a fresh random nonce; ``associated_data`` is authenticated."""
        raise NotImplementedError

    @rpc(idempotent=True)
    async def decrypt(self, key_id: str, ciphertext: bytes, associated_data: bytes = b"") -> bytes:
        """Open a ciphertext made by ``encrypt`` with the same key and associated data."""
        raise NotImplementedError

    @rpc(timeout=30.0)
    async def seal(self) -> bytes:
        """The whole key store, encrypted under a fresh KMS data key (a versioned blob) at the
        next generation: one more than the last sealed or unsealed (:func:`sealed_generation`).

        The host keeps the blob (the enclave has no disk) and hands it back to ``unseal``
        after a restart. Fails with ``FAILED_PRECONDITION`` when sealing is not configured.
        """
        raise NotImplementedError

    @rpc(timeout=30.0)
    async def unseal(self, sealed: bytes, min_generation: int = 0) -> list[KeyInfo]:
        """Load the key store from a blob made by ``seal``; returns the keys it contained.

        Only at start: once a key was created, or the store sealed or unsealed, ``unseal`` is
        ``FAILED_PRECONDITION``. A blob older than ``min_generation`` (the latest generation the
        caller recorded) or than any generation this enclave has seen is refused
        (``FAILED_PRECONDITION``) before KMS is asked.
        """
        raise NotImplementedError
