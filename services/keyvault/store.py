"""The in-enclave key store and its serialised form (the plaintext inside a sealed blob).

Serialised form (msgpack), version 1::

    [1, [[key_id: str, key_type: str, label: str | None, created_ms: int, material: bytes], ...]]

``material`` is the raw private key: Ed25519 32-byte seed (RFC 8032), P-256 32-byte big-endian
private scalar, AES-256 32-byte key. Raw forms keep the blob small and independent of any
PKCS#8 encoder. The serialised bytes only ever exist inside the enclave, and only on the way into
AES-256-GCM (``services.keyvault.sealing``).
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
from collections.abc import Iterable

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from services.keyvault.interface import KeyInfo, KeyType

__all__ = ["FORMAT_VERSION", "Key", "StoreFormatError", "dump_keys", "generate", "load_keys"]

FORMAT_VERSION = 1
_MATERIAL_BYTES = 32
_KEY_ID_BYTES = 16


class StoreFormatError(ValueError):
    """Serialised key store bytes that do not decode (only reachable after AEAD succeeded)."""


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Key:
    """One key with its material. ``repr`` never shows the material."""

    info: KeyInfo
    material: bytes

    def __repr__(self) -> str:
        return f"Key({self.info.key_id!r}, {self.info.key_type.value})"

    def ed25519(self) -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.from_private_bytes(self.material)

    def ecdsa(self) -> ec.EllipticCurvePrivateKey:
        return ec.derive_private_key(int.from_bytes(self.material, "big"), ec.SECP256R1())

    def public_key_der(self) -> bytes:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if self.info.key_type is KeyType.ED25519:
            return self.ed25519().public_key().public_bytes(serialization.Encoding.DER, spki)
        return self.ecdsa().public_key().public_bytes(serialization.Encoding.DER, spki)

    def same_material(self, other: Key) -> bool:
        return self.info.key_type is other.info.key_type and hmac.compare_digest(
            self.material, other.material
        )


def new_key_id() -> str:
    # 128 random bits: ids from different enclaves or restarts never collide in practice,
    # which keeps merging sealed stores simple.
    return "k_" + secrets.token_hex(_KEY_ID_BYTES)


def generate(key_type: KeyType, label: str | None, created_ms: int) -> Key:
    if key_type is KeyType.ED25519:
        material = ed25519.Ed25519PrivateKey.generate().private_bytes_raw()
    elif key_type is KeyType.ECDSA_P256:
        scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
        material = scalar.to_bytes(_MATERIAL_BYTES, "big")
    else:
        material = secrets.token_bytes(_MATERIAL_BYTES)
    return Key(KeyInfo(new_key_id(), key_type, label, created_ms), material)


def dump_keys(keys: Iterable[Key]) -> bytes:
    rows = [
        [k.info.key_id, k.info.key_type.value, k.info.label, k.info.created_ms, k.material]
        for k in keys
    ]
    return bytes(msgpack.packb([FORMAT_VERSION, rows], use_bin_type=True))


def load_keys(data: bytes) -> list[Key]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise StoreFormatError(f"key store does not decode: {type(exc).__name__}") from exc
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[1], list)):
        raise StoreFormatError("key store is not [version, rows]")
    if obj[0] != FORMAT_VERSION:
        raise StoreFormatError(f"key store version {obj[0]!r} is not {FORMAT_VERSION}")
    keys: list[Key] = []
    seen: set[str] = set()
    for row in obj[1]:
        keys.append(_load_row(row))
        if keys[-1].info.key_id in seen:
            raise StoreFormatError("key store lists a key id twice")
        seen.add(keys[-1].info.key_id)
    return keys


def _load_row(row: object) -> Key:
    if not (isinstance(row, list) and len(row) == 5):
        raise StoreFormatError("key row is not a 5-element array")
    key_id, key_type, label, created_ms, material = row
    if not isinstance(key_id, str) or not key_id:
        raise StoreFormatError("key id is not a non-empty string")
    try:
        kind = KeyType(key_type)
    except ValueError:
        raise StoreFormatError(f"unknown key type {key_type!r}") from None
    if label is not None and not isinstance(label, str):
        raise StoreFormatError("label is not a string or nil")
    if not isinstance(created_ms, int) or isinstance(created_ms, bool):
        raise StoreFormatError("created_ms is not an integer")
    if not isinstance(material, bytes) or len(material) != _MATERIAL_BYTES:
        raise StoreFormatError("key material is not 32 bytes")
    key = Key(KeyInfo(key_id, kind, label, created_ms), material)
    if kind is KeyType.ECDSA_P256:
        try:
            key.ecdsa()  # a scalar of 0 or >= n is not a P-256 key
        except ValueError:
            raise StoreFormatError("P-256 scalar out of range") from None
    return key
