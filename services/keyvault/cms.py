"""CMS EnvelopedData as AWS KMS returns it in ``CiphertextForRecipient`` (RFC 5652).

KMS encrypts the result of ``Decrypt`` / ``GenerateDataKey`` to the RSA public key found in the
enclave's attestation document and wraps it as BER (indefinite lengths) ``ContentInfo`` with:

* ``EnvelopedData`` version 2, no originator info, no unprotected attributes;
* one ``KeyTransRecipientInfo`` (version 2, recipient identified by subject key identifier),
  key encryption RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 8017; empty label);
* encrypted content of type ``data``, AES-256-CBC (16-byte IV in the algorithm parameters),
  PKCS#7 padding.

The parser accepts exactly that shape and nothing weaker (no PKCS#1 v1.5, no SHA-1 OAEP, no
other ciphers): anything else raises :class:`EnvelopeError`. How KMS derives the subject key
identifier is not documented, so its value is not compared with the enclave's key; the
RSA-OAEP decryption is what binds the envelope to that key. Every decryption failure (RSA,
content key length, padding) raises the same error with the same message, so nothing reaching
a caller tells them apart. :func:`build_envelope` produces the same shape; it serves the local
KMS-compatible test server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vrpc.exceptions import VrpcError

__all__ = [
    "DECRYPTION_FAILED",
    "MAX_ENVELOPE_BYTES",
    "Envelope",
    "EnvelopeError",
    "build_envelope",
    "open_envelope",
]

DECRYPTION_FAILED = "the envelope does not decrypt with this enclave's key"
#: KMS results are small (a plaintext is at most 4 KiB); refuse anything far larger unparsed.
MAX_ENVELOPE_BYTES = 16 * 1024
_AES_BLOCK = 16


class EnvelopeError(VrpcError):
    """``CiphertextForRecipient`` is malformed, of an unexpected shape, or does not decrypt."""


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """The parts of a KMS CMS envelope the enclave needs."""

    recipient_key_id: bytes  # subject key identifier KMS put in the recipient info
    encrypted_key: bytes  # RSAES-OAEP-SHA-256 of the AES-256 content key
    iv: bytes
    ciphertext: bytes  # AES-256-CBC, PKCS#7 padded

    @classmethod
    def parse(cls, data: bytes) -> Envelope:
        if len(data) > MAX_ENVELOPE_BYTES:
            raise EnvelopeError(f"envelope is {len(data)} bytes, more than {MAX_ENVELOPE_BYTES}")
        try:
            return _parse(data)
        except EnvelopeError:
            raise
        except Exception as exc:  # asn1crypto raises ValueError, TypeError and kin lazily
            raise EnvelopeError(f"envelope does not parse: {type(exc).__name__}") from exc

    def open(self, private_key: rsa.RSAPrivateKey) -> bytes:
        """Decrypt with the enclave's RSA key; the plaintext KMS meant for this enclave."""
        try:
            content_key = private_key.decrypt(self.encrypted_key, _oaep())
            if len(content_key) != 32:
                raise ValueError("content key length")
            decryptor = Cipher(algorithms.AES256(content_key), modes.CBC(self.iv)).decryptor()
            padded = decryptor.update(self.ciphertext) + decryptor.finalize()
            unpadder = padding.PKCS7(128).unpadder()
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise EnvelopeError(DECRYPTION_FAILED) from None


def open_envelope(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Parse ``CiphertextForRecipient`` and decrypt it with ``private_key``."""
    return Envelope.parse(data).open(private_key)


def _oaep() -> OAEP:
    return OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _parse(data: bytes) -> Envelope:
    info = cms.ContentInfo.load(data, strict=True)
    if info["content_type"].native != "enveloped_data":
        raise EnvelopeError(f"content type is {info['content_type'].native}, not enveloped_data")
    enveloped = info["content"]
    if enveloped["version"].native != "v2":
        raise EnvelopeError(f"EnvelopedData version is {enveloped['version'].native}, not v2")
    if enveloped["originator_info"].native is not None:
        raise EnvelopeError("EnvelopedData carries originator info")
    if enveloped["unprotected_attrs"].native is not None:
        raise EnvelopeError("EnvelopedData carries unprotected attributes")
    recipients = enveloped["recipient_infos"]
    if len(recipients) != 1:
        raise EnvelopeError(f"{len(recipients)} recipient infos, expected exactly 1")
    if recipients[0].name != "ktri":
        raise EnvelopeError(f"recipient info is {recipients[0].name}, expected ktri")
    ktri = recipients[0].chosen
    if ktri["version"].native != "v2":
        raise EnvelopeError(f"recipient info version is {ktri['version'].native}, not v2")
    rid = ktri["rid"]
    if rid.name != "subject_key_identifier":
        raise EnvelopeError("recipient is not identified by subject key identifier")
    if not 0 < len(rid.native) <= 64:
        raise EnvelopeError("subject key identifier is empty or longer than 64 bytes")
    _check_oaep(ktri["key_encryption_algorithm"])
    encrypted_key = ktri["encrypted_key"].native
    content = enveloped["encrypted_content_info"]
    if content["content_type"].native != "data":
        raise EnvelopeError(f"encrypted content type is {content['content_type'].native}, not data")
    algorithm = content["content_encryption_algorithm"]
    if algorithm["algorithm"].native != "aes256_cbc":
        raise EnvelopeError(f"content cipher is {algorithm['algorithm'].native}, not aes256_cbc")
    iv = algorithm["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != _AES_BLOCK:
        raise EnvelopeError("AES-256-CBC IV is not 16 bytes")
    ciphertext = content["encrypted_content"].native
    if not isinstance(ciphertext, bytes) or not ciphertext or len(ciphertext) % _AES_BLOCK:
        raise EnvelopeError("encrypted content is absent or not a whole number of AES blocks")
    return Envelope(bytes(rid.native), bytes(encrypted_key), iv, ciphertext)


def _check_oaep(algorithm: cms.KeyEncryptionAlgorithm) -> None:
    if algorithm["algorithm"].native != "rsaes_oaep":
        raise EnvelopeError(f"key encryption is {algorithm['algorithm'].native}, not rsaes_oaep")
    params = algorithm["parameters"]
    hash_name = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    mgf_hash = mgf["parameters"]["algorithm"].native
    label = params["p_source_algorithm"]["parameters"].native
    if hash_name != "sha256" or mgf["algorithm"].native != "mgf1" or mgf_hash != "sha256":
        raise EnvelopeError(f"OAEP uses {hash_name}/{mgf_hash}, expected sha256 with MGF1-sha256")
    if label not in (b"", None):
        raise EnvelopeError("OAEP label is not empty")


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """A 32-byte identifier for the recipient key (SHA-256 of its SPKI DER)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def build_envelope(plaintext: bytes, recipient: rsa.RSAPublicKey) -> bytes:
    """Encrypt ``plaintext`` to ``recipient`` in KMS's CiphertextForRecipient shape (DER)."""
    content_key = os.urandom(32)
    iv = os.urandom(_AES_BLOCK)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(content_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    oaep_params = algos.RSAESOAEPParams(
        {
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            "p_source_algorithm": {"algorithm": "p_specified", "parameters": b""},
        }
    )
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": "v2",
            "rid": cms.RecipientIdentifier(
                name="subject_key_identifier", value=subject_key_identifier(recipient)
            ),
            "key_encryption_algorithm": {"algorithm": "rsaes_oaep", "parameters": oaep_params},
            "encrypted_key": recipient.encrypt(content_key, _oaep()),
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": "v2",
            "recipient_infos": [cms.RecipientInfo(name="ktri", value=ktri)],
            "encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
                "encrypted_content": core.OctetString(ciphertext),
            },
        }
    )
    info = cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped})
    return bytes(info.dump())
