"""keyvault.v1 operations called directly on the implementation."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from services.keyvault import MAX_LABEL_CHARS, MAX_MESSAGE_BYTES, KeyInfo, KeyType, KeyVault
from services.keyvault.impl import KeyVaultImpl
from vrpc.exceptions import RpcError
from vrpc.service import describe_service
from vrpc.status import Status


async def expect(status: Status, coro: object, param: str | None) -> RpcError:
    with pytest.raises(RpcError) as info:
        await coro  # type: ignore[misc]
    assert info.value.status is status, info.value
    assert info.value.details["param"] == param
    assert info.value.message
    return info.value


async def test_create_list_delete(vault: KeyVaultImpl) -> None:
    a = await vault.create_key(KeyType.ED25519, "signing")
    b = await vault.create_key(KeyType.ECDSA_P256)
    c = await vault.create_key(KeyType.AES_256_GCM, label="data")
    assert isinstance(a, KeyInfo) and a.label == "signing" and a.key_type is KeyType.ED25519
    assert len({a.key_id, b.key_id, c.key_id}) == 3
    assert await vault.list_keys() == [a, b, c]
    await vault.delete_key(b.key_id)
    assert await vault.list_keys() == [a, c]
    err = await expect(Status.NOT_FOUND, vault.delete_key(b.key_id), "key_id")
    assert b.key_id in err.message


async def test_ed25519_sign_verifies_with_public_key(vault: KeyVaultImpl) -> None:
    key = await vault.create_key(KeyType.ED25519)
    signature = await vault.sign(key.key_id, b"hello")
    public = serialization.load_der_public_key(await vault.public_key(key.key_id))
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(signature, b"hello")
    assert len(signature) == 64
    assert await vault.verify(key.key_id, b"hello", signature)
    assert not await vault.verify(key.key_id, b"hellO", signature)
    assert not await vault.verify(key.key_id, b"hello", b"short")


async def test_ecdsa_sign_verifies_with_public_key(vault: KeyVaultImpl) -> None:
    key = await vault.create_key(KeyType.ECDSA_P256)
    signature = await vault.sign(key.key_id, b"hello")
    public = serialization.load_der_public_key(await vault.public_key(key.key_id))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    public.verify(signature, b"hello", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"other", ec.ECDSA(hashes.SHA256()))
    assert await vault.verify(key.key_id, b"hello", signature)
    assert not await vault.verify(key.key_id, b"other", signature)
    assert not await vault.verify(key.key_id, b"hello", b"\x30\x00garbage")


async def test_encrypt_decrypt_with_associated_data(vault: KeyVaultImpl) -> None:
    key = await vault.create_key(KeyType.AES_256_GCM)
    ct = await vault.encrypt(key.key_id, b"secret", associated_data=b"ctx")
    assert ct[0] == 1 and len(ct) == 1 + 12 + len(b"secret") + 16
    assert b"secret" not in ct
    assert await vault.decrypt(key.key_id, ct, associated_data=b"ctx") == b"secret"
    assert await vault.encrypt(key.key_id, b"secret", b"ctx") != ct  # fresh nonce
    await expect(Status.INVALID_ARGUMENT, vault.decrypt(key.key_id, ct), "ciphertext")
    tampered = ct[:-1] + bytes([ct[-1] ^ 1])
    await expect(Status.INVALID_ARGUMENT, vault.decrypt(key.key_id, tampered, b"ctx"), "ciphertext")
    await expect(Status.INVALID_ARGUMENT, vault.decrypt(key.key_id, ct[:20], b"ctx"), "ciphertext")
    await expect(Status.INVALID_ARGUMENT, vault.decrypt(key.key_id, b"\x02" + ct[1:]), "ciphertext")
    other = await vault.create_key(KeyType.AES_256_GCM)
    await expect(Status.INVALID_ARGUMENT, vault.decrypt(other.key_id, ct, b"ctx"), "ciphertext")


async def test_empty_plaintext_roundtrips(vault: KeyVaultImpl) -> None:
    key = await vault.create_key(KeyType.AES_256_GCM)
    assert await vault.decrypt(key.key_id, await vault.encrypt(key.key_id, b"")) == b""


async def test_unknown_key_is_not_found(vault: KeyVaultImpl) -> None:
    for call in (
        vault.sign("k_nope", b"m"),
        vault.verify("k_nope", b"m", b"s"),
        vault.public_key("k_nope"),
        vault.encrypt("k_nope", b"m"),
        vault.decrypt("k_nope", b"m"),
        vault.delete_key("x" * 10_000),
    ):
        err = await expect(Status.NOT_FOUND, call, "key_id")
        assert len(err.message) < 200  # a huge id is not echoed whole


async def test_wrong_key_type_is_failed_precondition(vault: KeyVaultImpl) -> None:
    aes = await vault.create_key(KeyType.AES_256_GCM)
    ed = await vault.create_key(KeyType.ED25519)
    ecdsa = await vault.create_key(KeyType.ECDSA_P256)
    err = await expect(Status.FAILED_PRECONDITION, vault.sign(aes.key_id, b"m"), "key_id")
    assert "aes-256-gcm" in err.message and err.details["key_type"] == "aes-256-gcm"
    await expect(Status.FAILED_PRECONDITION, vault.verify(aes.key_id, b"m", b"s"), "key_id")
    await expect(Status.FAILED_PRECONDITION, vault.public_key(aes.key_id), "key_id")
    for key in (ed, ecdsa):
        err = await expect(Status.FAILED_PRECONDITION, vault.encrypt(key.key_id, b"m"), "key_id")
        assert err.details["expected"] == ["aes-256-gcm"]
        await expect(Status.FAILED_PRECONDITION, vault.decrypt(key.key_id, b"m"), "key_id")


async def test_oversize_arguments_are_invalid(vault: KeyVaultImpl) -> None:
    big = b"x" * (MAX_MESSAGE_BYTES + 1)
    ed = await vault.create_key(KeyType.ED25519)
    aes = await vault.create_key(KeyType.AES_256_GCM)
    err = await expect(Status.INVALID_ARGUMENT, vault.sign(ed.key_id, big), "message")
    assert err.details["max_bytes"] == MAX_MESSAGE_BYTES
    assert err.details["got_bytes"] == len(big)
    await expect(Status.INVALID_ARGUMENT, vault.verify(ed.key_id, big, b""), "message")
    await expect(Status.INVALID_ARGUMENT, vault.verify(ed.key_id, b"", b"s" * 2000), "signature")
    await expect(Status.INVALID_ARGUMENT, vault.encrypt(aes.key_id, big), "plaintext")
    await expect(Status.INVALID_ARGUMENT, vault.encrypt(aes.key_id, b"", big), "associated_data")
    await expect(Status.INVALID_ARGUMENT, vault.decrypt(aes.key_id, big * 2), "ciphertext")
    # The limit itself is accepted.
    assert len(await vault.sign(ed.key_id, big[:-1])) == 64


async def test_bad_create_arguments(vault: KeyVaultImpl) -> None:
    unknown: Any = "rsa-4096"
    await expect(Status.INVALID_ARGUMENT, vault.create_key(unknown), "key_type")
    await expect(
        Status.INVALID_ARGUMENT,
        vault.create_key(KeyType.ED25519, "l" * (MAX_LABEL_CHARS + 1)),
        "label",
    )
    # A plain string naming a known type is accepted (the wire carries enum values).
    known: Any = "ed25519"
    info = await vault.create_key(known)
    assert info.key_type is KeyType.ED25519


async def test_vault_is_bounded() -> None:
    vault = KeyVaultImpl(max_keys=2)
    await vault.create_key(KeyType.ED25519)
    await vault.create_key(KeyType.ED25519)
    err = await expect(Status.RESOURCE_EXHAUSTED, vault.create_key(KeyType.ED25519), "key_type")
    assert err.details["max_keys"] == 2


async def test_seal_without_kms_is_failed_precondition(vault: KeyVaultImpl) -> None:
    err = await expect(Status.FAILED_PRECONDITION, vault.seal(), None)
    assert "VRPC_KMS_KEY_ID" in err.message
    await expect(Status.FAILED_PRECONDITION, vault.unseal(b"x"), None)


def test_interface_declares_the_contract() -> None:
    methods = describe_service(KeyVault)
    assert KeyVault.service_name == "keyvault.v1"
    assert set(methods) == {
        "create_key", "list_keys", "delete_key", "public_key", "sign", "verify",
        "encrypt", "decrypt", "seal", "unseal",
    }  # fmt: skip
    read_only = {"list_keys", "public_key", "sign", "verify", "encrypt", "decrypt"}
    assert {name for name, m in methods.items() if m.idempotent} == read_only
    assert describe_service(KeyVaultImpl).keys() == methods.keys()
    assert KeyVaultImpl.service_name == "keyvault.v1"


def test_interface_imports_without_enclave_dependencies() -> None:
    # A host importing the interface must not need the KMS/CMS libraries (enclave-only), nor
    # load the implementation. (cryptography is a vrpc dependency on both sides.)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'botocore', 'asn1crypto'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import services.keyvault, services.keyvault.interface\n"
        "from vrpc.service import describe_service\n"
        "assert 'services.keyvault.impl' not in sys.modules\n"
        "print(len(describe_service(services.keyvault.KeyVault)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "10"


async def test_key_material_is_not_in_repr(vault: KeyVaultImpl) -> None:
    info = await vault.create_key(KeyType.AES_256_GCM)
    key = vault._keys[info.key_id]
    assert key.material.hex() not in repr(key)
    assert repr(key.material) not in repr(key)


def test_create_server_builds_a_vrpc_server(
    test_attester: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.keyvault.impl import create_server
    from vrpc.auth import CallerAuthenticator
    from vrpc.server import Server

    callers = tmp_path / "callers.json"
    public = base64.b64encode(bytes(32)).decode()  # any 32 bytes decode as an Ed25519 point
    entry = {"key_id": "ops", "public_key": public, "roles": ["admin"]}
    callers.write_text(json.dumps({"callers": [entry]}))
    monkeypatch.setenv("VRPC_KEYVAULT_CALLERS", str(callers))
    monkeypatch.delenv("VRPC_KMS_KEY_ID", raising=False)
    server = create_server(attester=test_attester)
    assert isinstance(server, Server)
    assert [type(i) for i in server.interceptors] == [CallerAuthenticator]
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    monkeypatch.setenv("VRPC_KMS_KEY_ID", arn)
    assert isinstance(create_server(attester=test_attester), Server)
    monkeypatch.setenv("VRPC_KMS_KEY_ID", "alias/vrpc-keyvault")
    from services.keyvault.sealing import KeyIdentityError

    with pytest.raises(KeyIdentityError, match="full key ARN"):
        create_server(attester=test_attester)


def test_create_server_refuses_to_start_without_trusted_callers(
    test_attester: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.keyvault.impl import create_server

    monkeypatch.delenv("VRPC_KMS_KEY_ID", raising=False)
    monkeypatch.delenv("VRPC_KEYVAULT_CALLERS", raising=False)
    with pytest.raises(ValueError, match="VRPC_KEYVAULT_CALLERS is not set"):
        create_server(attester=test_attester)
    monkeypatch.setenv("VRPC_KEYVAULT_CALLERS", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="cannot read the trusted callers file"):
        create_server(attester=test_attester)
    empty = tmp_path / "empty.json"
    empty.write_text('{"callers": []}')
    monkeypatch.setenv("VRPC_KEYVAULT_CALLERS", str(empty))
    with pytest.raises(ValueError, match="lists no caller"):
        create_server(attester=test_attester)


async def test_key_use_needs_a_signer_role_when_checked() -> None:
    from vrpc.auth import Caller, _current

    vault = KeyVaultImpl(check_key_use=True)
    ed = await vault.create_key(KeyType.ED25519)
    aes = await vault.create_key(KeyType.AES_256_GCM)
    # No authenticated caller at all (a server built without the authenticator): refused.
    await expect(Status.UNAUTHENTICATED, vault.sign(ed.key_id, b"m"), None)
    token = _current.set(Caller("payments", frozenset({f"signer:{ed.key_id}"})))
    try:
        assert len(await vault.sign(ed.key_id, b"m")) == 64
        err = await expect(Status.PERMISSION_DENIED, vault.encrypt(aes.key_id, b"m"), "key_id")
        assert err.message == (
            f"caller 'payments' may not encrypt with key {aes.key_id} "
            f"(needs role signer:{aes.key_id})"
        )
        await expect(Status.PERMISSION_DENIED, vault.decrypt(aes.key_id, bytes(40)), "key_id")
        # Public information needs no signer role.
        other = await vault.create_key(KeyType.ED25519)
        assert await vault.public_key(other.key_id)
        assert not await vault.verify(other.key_id, b"m", bytes(64))
        await expect(Status.PERMISSION_DENIED, vault.sign(other.key_id, b"m"), "key_id")
    finally:
        _current.reset(token)
    token = _current.set(Caller("all", frozenset({"signer:*"})))
    try:
        ct = await vault.encrypt(aes.key_id, b"m")
        assert await vault.decrypt(aes.key_id, ct) == b"m"
    finally:
        _current.reset(token)
