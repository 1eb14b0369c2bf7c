"""CMS EnvelopedData in KMS's CiphertextForRecipient shape: real samples and round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from services.keyvault.cms import (
    DECRYPTION_FAILED,
    Envelope,
    EnvelopeError,
    build_envelope,
    open_envelope,
)

_KEY = rsa.generate_private_key(65537, 2048)
_MGF1_SHA1 = {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}}


def test_kms_sample_1_parses(kms_vectors: Path) -> None:
    data = (kms_vectors / "kms_cms_envelopeddata_sample1.ber").read_bytes()
    assert data[1] == 0x80  # indefinite-length BER, as KMS sends it
    env = Envelope.parse(data)
    assert len(env.encrypted_key) == 256
    assert env.iv.hex().startswith("688c6d5f")
    assert len(env.ciphertext) == 48
    assert len(env.recipient_key_id) == 32
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        env.open(_KEY)  # no private key exists for the samples


def test_kms_sample_2_parses(kms_vectors: Path) -> None:
    data = (kms_vectors / "kms_cms_envelopeddata_sample2_ctx.ber").read_bytes()
    env = Envelope.parse(data)
    assert len(env.encrypted_key) == 256
    assert len(env.iv) == 16 and len(env.ciphertext) % 16 == 0


def test_kms_sample_truncations_fail_cleanly(kms_vectors: Path) -> None:
    data = (kms_vectors / "kms_cms_envelopeddata_sample1.ber").read_bytes()
    for cut in range(len(data)):
        with pytest.raises(EnvelopeError):
            Envelope.parse(data[:cut])
    with pytest.raises(EnvelopeError):
        Envelope.parse(data + b"\x00")  # trailing bytes


@pytest.mark.parametrize("size", [0, 1, 15, 16, 32, 4096])
def test_build_and_open_roundtrip(size: int) -> None:
    plaintext = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert open_envelope(build_envelope(plaintext, _KEY.public_key()), _KEY) == plaintext


def test_wrong_private_key_is_refused() -> None:
    other = rsa.generate_private_key(65537, 2048)
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        open_envelope(build_envelope(b"k" * 32, _KEY.public_key()), other)


def _mutate(path: list[str], value: object) -> bytes:
    info = cms.ContentInfo.load(build_envelope(b"k" * 32, _KEY.public_key()))
    node = info["content"]
    for step in path[:-1]:
        node = node[int(step)] if step.isdigit() else node[step]
    node[path[-1]] = value
    return bytes(info.dump(force=True))


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (
            ["encrypted_content_info", "content_encryption_algorithm"],
            {"algorithm": "aes128_cbc", "parameters": b"\x00" * 16},
            "aes256_cbc",
        ),
        (
            ["recipient_infos", "0", "key_encryption_algorithm"],
            {"algorithm": "rsaes_pkcs1v15"},
            "rsaes_oaep",
        ),
        (
            ["recipient_infos", "0", "key_encryption_algorithm"],
            {
                "algorithm": "rsaes_oaep",
                "parameters": {
                    "hash_algorithm": {"algorithm": "sha1"},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1",
                        "parameters": {"algorithm": "sha1"},
                    },
                },
            },
            "sha256",
        ),
    ],
)
def test_weaker_algorithms_are_refused(path: list[str], value: object, reason: str) -> None:
    data = _mutate_ktri(path[2:], value) if path[0] == "recipient_infos" else _mutate(path, value)
    with pytest.raises(EnvelopeError, match=reason):
        Envelope.parse(data)


def _mutate_ktri(path: list[str], value: object) -> bytes:
    info = cms.ContentInfo.load(build_envelope(b"k" * 32, _KEY.public_key()))
    ktri = info["content"]["recipient_infos"][0].chosen
    ktri[path[0]] = value
    return bytes(info.dump(force=True))


def test_bad_iv_length_is_refused() -> None:
    data = _mutate(
        ["encrypted_content_info", "content_encryption_algorithm"],
        {"algorithm": "aes256_cbc", "parameters": b"\x00" * 8},
    )
    with pytest.raises(EnvelopeError, match="IV"):
        Envelope.parse(data)


def test_not_enveloped_data_is_refused() -> None:
    data = cms.ContentInfo({"content_type": "data", "content": b"x"}).dump()
    with pytest.raises(EnvelopeError, match="enveloped_data"):
        Envelope.parse(data)


def test_oversize_is_refused_before_parsing() -> None:
    with pytest.raises(EnvelopeError, match="more than"):
        Envelope.parse(b"\x30" * 20_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_envelope_error(data: bytes) -> None:
    try:
        Envelope.parse(data)
    except EnvelopeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_corrupted_real_envelope_only_raises_envelope_error(pos: int, byte: int) -> None:
    data = bytearray(build_envelope(b"k" * 32, _KEY.public_key()))
    data[pos % len(data)] = byte
    try:
        open_envelope(bytes(data), _KEY)
    except EnvelopeError:
        pass


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda env: env.__setitem__("version", "v0"), "EnvelopedData version is v0"),
        (
            lambda env: env["recipient_infos"][0].chosen.__setitem__("version", "v0"),
            "recipient info version is v0",
        ),
        (
            lambda env: env["encrypted_content_info"].__setitem__("content_type", "signed_data"),
            "encrypted content type is signed_data",
        ),
        (
            lambda env: env.__setitem__(
                "unprotected_attrs", [{"type": "content_type", "values": ["data"]}]
            ),
            "unprotected attributes",
        ),
        (
            lambda env: env["recipient_infos"][0].chosen.__setitem__(
                "rid", cms.RecipientIdentifier(name="subject_key_identifier", value=b"")
            ),
            "subject key identifier is empty",
        ),
    ],
)
def test_envelope_fields_are_checked(mutate: Any, reason: str) -> None:
    info = cms.ContentInfo.load(build_envelope(b"k" * 32, _KEY.public_key()))
    mutate(info["content"])
    with pytest.raises(EnvelopeError, match=reason):
        Envelope.parse(bytes(info.dump(force=True)))


def _envelope(content_key: bytes, plaintext_block: bytes, key: rsa.RSAPrivateKey) -> Envelope:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from services.keyvault.cms import _oaep

    iv = bytes(16)
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    body = encryptor.update(plaintext_block) + encryptor.finalize()
    return Envelope(b"id", key.public_key().encrypt(content_key, _oaep()), iv, body)


def test_every_decryption_failure_is_one_error() -> None:
    other = rsa.generate_private_key(65537, 2048)
    failures = [
        (_envelope(b"c" * 32, b"k" * 16, other), _KEY),  # RSA: another key
        (_envelope(b"c" * 32, b"k" * 15 + b"\x00", _KEY), _KEY),  # PKCS#7 padding
        (_envelope(b"c" * 16, b"k" * 15 + b"\x01", _KEY), _KEY),  # content key length
    ]
    messages = set()
    for envelope, key in failures:
        with pytest.raises(EnvelopeError) as info:
            envelope.open(key)
        messages.add(str(info.value))
    assert messages == {DECRYPTION_FAILED}
    assert _envelope(b"c" * 32, b"k" * 15 + b"\x01", _KEY).open(_KEY) == b"k" * 15
