"""Sealing the key store with AWS KMS, the Nitro Enclaves way.

Sealed blob, version 2 (all integers big-endian)::

    offset  size  field
    0       4     magic  b"VRKV"
    4       1     version = 2
    5       8     generation (1, 2, ...: each seal of one vault is one more than the last)
    13      2     n = length of the KMS ciphertext blob (1..6144)
    15      n     KMS CiphertextBlob of the AES-256 data key (from GenerateDataKey)
    15+n    12    AES-GCM nonce (random)
    27+n    rest  AES-256-GCM(data key, nonce, serialised key store) || 16-byte tag
                  associated data = bytes 0 .. 15+n (magic, version, generation, n, KMS blob)

The generation is readable without KMS (a host records the latest one it saw) and authenticated
by the AES-GCM tag: only the enclave, holding the data key, can write a blob of any generation.

Sealing: generate an ephemeral RSA-2048 key pair; get an attestation document from the NSM with
the public key (SPKI DER) in its ``public_key`` field; call ``GenerateDataKey`` with
``Recipient = {AttestationDocument, KeyEncryptionAlgorithm: RSAES_OAEP_SHA_256}``; open
``CiphertextForRecipient`` (CMS) with the private key; encrypt the store under the data key.
Unsealing: the same, with ``Decrypt`` of the stored KMS blob. The RSA key lives for one call.

Key identity: the enclave talks to exactly one KMS key, named by its full ARN at build time (an
alias or bare key id would be resolved by KMS in the account of the credentials, which the parent
supplies). Every KMS reply names the key it used (``KeyId``); a reply for any other key is refused
before anything is sealed or unsealed (:class:`KeyIdentityError`).

The KMS encryption context ``{"vrpc:service": "keyvault.v1", "vrpc:sealed-format": "2"}`` binds
the data key to this use; the key policy requires ``vrpc:service``. A blob is only as private as
the KMS key policy is strict: ``deploy/kms-key-policy.json`` demands this build's measurement
(``kms:RecipientAttestation:ImageSha384``), see docs/deployment.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import struct
from typing import Protocol

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.keyvault.cms import open_envelope
from services.keyvault.interface import MAX_SEALED_BYTES
from services.keyvault.kms import KmsClient
from vrpc.attestation import Attester
from vrpc.exceptions import VrpcError

__all__ = [
    "ENCRYPTION_CONTEXT",
    "MAGIC",
    "VERSION",
    "Attester",
    "KeyArn",
    "KeyIdentityError",
    "KmsSealer",
    "SealedBlob",
    "SealedFormatError",
    "Sealer",
]

log = structlog.get_logger("vrpc.keyvault.sealing")

MAGIC = b"VRKV"
VERSION = 2
ENCRYPTION_CONTEXT = {"vrpc:service": "keyvault.v1", "vrpc:sealed-format": str(VERSION)}
_HEADER = struct.Struct(">4sBQH")
_MAX_GENERATION = (1 << 63) - 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
_MAX_KMS_BLOB = 6144  # KMS ciphertext blobs are well under this
_RSA_BITS = 2048


# arn:PARTITION:kms:REGION:ACCOUNT:key/KEY-ID, KEY-ID a UUID or a multi-Region key id.
_KEY_ARN = re.compile(
    r"arn:(?P<partition>aws|aws-cn|aws-us-gov):kms:(?P<region>[a-z]{2}(?:-[a-z]+)+-[0-9]):"
    r"(?P<account>[0-9]{12}):key/(?P<key>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
    r"[0-9a-f]{12}|mrk-[0-9a-f]{32})"
)


class KeyIdentityError(VrpcError):
    """The configured key is not a full key ARN, or KMS answered for a different key."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeyArn:
    """A full KMS key ARN: the only key identity the enclave accepts."""

    arn: str
    partition: str
    region: str
    account: str

    @classmethod
    def parse(cls, value: str) -> KeyArn:
        match = _KEY_ARN.fullmatch(value)
        if match is None:
            raise KeyIdentityError(
                f"KMS key must be a full key ARN (arn:aws:kms:REGION:ACCOUNT:key/UUID), got "
                f"{value[:120]!r}: an alias or key id is resolved in the account of the "
                "credentials, which the parent instance supplies"
            )
        return cls(value, match["partition"], match["region"], match["account"])


class SealedFormatError(VrpcError):
    """The bytes are not a sealed key store of a known version, or do not authenticate."""


class Sealer(Protocol):
    """Seals the serialised store at a generation; ``generation`` reads it from a blob (not yet
    authenticated), ``unseal`` authenticates and returns both."""

    async def seal(self, plaintext: bytes, generation: int) -> bytes: ...

    def generation(self, blob: bytes) -> int: ...

    async def unseal(self, blob: bytes) -> tuple[int, bytes]: ...


class SealedBlob:
    """Parse/build the versioned blob; AES-GCM with a data key the caller obtained."""

    def __init__(self, generation: int, kms_blob: bytes, nonce: bytes, ciphertext: bytes) -> None:
        self.generation = generation
        self.kms_blob = kms_blob
        self.nonce = nonce
        self.ciphertext = ciphertext

    @staticmethod
    def header(generation: int, kms_blob: bytes) -> bytes:
        if not 0 < len(kms_blob) <= _MAX_KMS_BLOB:
            raise SealedFormatError(f"KMS blob is {len(kms_blob)} bytes, not 1..{_MAX_KMS_BLOB}")
        if not 0 < generation <= _MAX_GENERATION:
            raise SealedFormatError(f"generation {generation} is out of range")
        return _HEADER.pack(MAGIC, VERSION, generation, len(kms_blob)) + kms_blob

    @classmethod
    def encrypt(cls, data_key: bytes, kms_blob: bytes, plaintext: bytes, generation: int) -> bytes:
        header = cls.header(generation, kms_blob)
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + AESGCM(data_key).encrypt(nonce, plaintext, header)

    @classmethod
    def parse(cls, blob: bytes) -> SealedBlob:
        if len(blob) > MAX_SEALED_BYTES:
            raise SealedFormatError(f"sealed blob is larger than {MAX_SEALED_BYTES} bytes")
        if len(blob) < _HEADER.size:
            raise SealedFormatError("sealed blob is truncated")
        magic, version, generation, n = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise SealedFormatError("not a vrpc keyvault sealed blob (bad magic)")
        if version != VERSION:
            raise SealedFormatError(f"sealed blob version {version} is not supported")
        if not 0 < generation <= _MAX_GENERATION:
            raise SealedFormatError(f"generation {generation} is out of range")
        if not 0 < n <= _MAX_KMS_BLOB:
            raise SealedFormatError(f"KMS blob length {n} is out of range")
        start = _HEADER.size + n
        if len(blob) < start + _NONCE_BYTES + _TAG_BYTES:
            raise SealedFormatError("sealed blob is truncated")
        return cls(
            generation,
            blob[_HEADER.size : start],
            blob[start : start + _NONCE_BYTES],
            blob[start + _NONCE_BYTES :],
        )

    def decrypt(self, data_key: bytes) -> bytes:
        try:
            aad = self.header(self.generation, self.kms_blob)
            return AESGCM(data_key).decrypt(self.nonce, self.ciphertext, aad)
        except InvalidTag:
            raise SealedFormatError("sealed blob is corrupt or altered") from None


class KmsSealer:
    """Seal and unseal through KMS with an attested Recipient (see the module docstring)."""

    def __init__(self, kms: KmsClient, key_arn: str, attester: Attester) -> None:
        self._kms = kms
        self._key = KeyArn.parse(key_arn)
        self._key_id = self._key.arn
        self._attester = attester

    @property
    def key_arn(self) -> str:
        return self._key_id

    def _check_key(self, answered: str) -> None:
        # Exact comparison: KMS names keys by ARN in replies, and only the pinned key is ours.
        if answered != self._key_id:
            raise KeyIdentityError(
                f"KMS answered for key {answered[:120]!r}, but this enclave is pinned to "
                f"{self._key_id!r}; nothing was sealed or unsealed"
            )

    async def seal(self, plaintext: bytes, generation: int) -> bytes:
        SealedBlob.header(generation, b"-")  # refuse a bad generation before calling KMS
        private_key, document = await self._recipient()
        data_key = await self._kms.generate_data_key(
            self._key_id, attestation_document=document, encryption_context=ENCRYPTION_CONTEXT
        )
        self._check_key(data_key.key_id)
        key = await asyncio.to_thread(open_envelope, data_key.ciphertext_for_recipient, private_key)
        _check_data_key(key)
        log.info("key store sealed", generation=generation, bytes=len(plaintext))
        return SealedBlob.encrypt(key, data_key.ciphertext_blob, plaintext, generation)

    def generation(self, blob: bytes) -> int:
        return SealedBlob.parse(blob).generation

    async def unseal(self, blob: bytes) -> tuple[int, bytes]:
        parsed = SealedBlob.parse(blob)
        private_key, document = await self._recipient()
        answer = await self._kms.decrypt(
            parsed.kms_blob,
            attestation_document=document,
            key_id=self._key_id,
            encryption_context=ENCRYPTION_CONTEXT,
        )
        self._check_key(answer.key_id)
        key = await asyncio.to_thread(open_envelope, answer.ciphertext_for_recipient, private_key)
        _check_data_key(key)
        plaintext = parsed.decrypt(key)
        log.info("key store unsealed", generation=parsed.generation, bytes=len(plaintext))
        return parsed.generation, plaintext

    async def _recipient(self) -> tuple[rsa.RSAPrivateKey, bytes]:
        # RSA key generation takes tens of milliseconds: keep it off the event loop.
        private_key = await asyncio.to_thread(rsa.generate_private_key, 65537, _RSA_BITS)
        spki = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        document = await asyncio.to_thread(self._attester.attest, public_key=spki)
        return private_key, document


def _check_data_key(key: bytes) -> None:
    if len(key) != 32:
        raise SealedFormatError(f"KMS data key is {len(key)} bytes, expected 32 (AES_256)")
