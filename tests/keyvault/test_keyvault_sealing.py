"""Sealing the key store through a local KMS with attested recipients, end to end."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from keyvault_helpers import kms_client

from services.keyvault import KeyType, sealed_generation
from services.keyvault.impl import KeyVaultImpl, sealer_from_env
from services.keyvault.kms import KmsClient, KmsError
from services.keyvault.sealing import (
    ENCRYPTION_CONTEXT,
    MAGIC,
    KeyIdentityError,
    KmsSealer,
    SealedBlob,
    SealedFormatError,
)
from services.keyvault.testing import KmsRequestError, LocalKms
from vrpc.exceptions import RpcError
from vrpc.status import Status


def make_vault(kms: LocalKms, attester: Any, key_id: str) -> KeyVaultImpl:
    return KeyVaultImpl(sealer=KmsSealer(kms_client(kms), key_id, attester))


async def test_sealed_store_survives_restart(local_kms: LocalKms, test_attester: Any) -> None:
    key_arn = local_kms.create_key(alias="vault")
    before = make_vault(local_kms, test_attester, key_arn)
    ed = await before.create_key(KeyType.ED25519, "ed")
    ecdsa = await before.create_key(KeyType.ECDSA_P256)
    aes = await before.create_key(KeyType.AES_256_GCM, "data")
    ed_pub = await before.public_key(ed.key_id)
    ec_pub = await before.public_key(ecdsa.key_id)
    old_ct = await before.encrypt(aes.key_id, b"kept secret", b"ad")
    sealed = await before.seal()
    assert sealed.startswith(MAGIC + b"\x02") and sealed_generation(sealed) == 1
    assert b"kept secret" not in sealed and b"data" not in sealed
    del before  # the enclave restarts: a new instance with an empty store

    after = make_vault(local_kms, test_attester, key_arn)
    assert await after.list_keys() == []
    restored = await after.unseal(sealed)
    assert [k.key_id for k in restored] == [ed.key_id, ecdsa.key_id, aes.key_id]
    assert await after.list_keys() == [ed, ecdsa, aes]
    assert await after.decrypt(aes.key_id, old_ct, b"ad") == b"kept secret"
    # New signatures verify under the public keys published before the restart.
    ed_key = serialization.load_der_public_key(ed_pub)
    ed_key.verify(await after.sign(ed.key_id, b"m"), b"m")  # type: ignore[union-attr,call-arg]
    ec_key = serialization.load_der_public_key(ec_pub)
    assert isinstance(ec_key, ec.EllipticCurvePublicKey)
    ec_key.verify(await after.sign(ecdsa.key_id, b"m"), b"m", ec.ECDSA(hashes.SHA256()))
    assert await after.public_key(ed.key_id) == ed_pub

    generate_call, decrypt_call = local_kms.calls
    assert generate_call.action == "GenerateDataKey" and decrypt_call.action == "Decrypt"
    for call in local_kms.calls:
        assert call.body["Recipient"]["KeyEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
        assert call.body["EncryptionContext"] == ENCRYPTION_CONTEXT
        assert call.headers["content-type"] == "application/x-amz-json-1.1"
        assert call.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
        assert "x-amz-date" in call.headers
    assert generate_call.body["KeySpec"] == "AES_256"
    assert SealedBlob.parse(sealed).kms_blob.find(key_arn.encode()) > 0


async def test_generations_count_up_and_unseal_only_at_start(
    local_kms: LocalKms, test_attester: Any
) -> None:
    arn = local_kms.create_key()
    vault = make_vault(local_kms, test_attester, arn)
    first = await vault.create_key(KeyType.ED25519)
    gen1 = await vault.seal()
    second = await vault.create_key(KeyType.AES_256_GCM)
    await vault.delete_key(first.key_id)
    gen2 = await vault.seal()
    assert (sealed_generation(gen1), sealed_generation(gen2)) == (1, 2)
    # A running vault never unseals: not even its own latest store.
    with pytest.raises(RpcError) as info:
        await vault.unseal(gen2)
    assert info.value.status is Status.FAILED_PRECONDITION
    assert "only allowed at start" in info.value.message

    restarted = make_vault(local_kms, test_attester, arn)
    calls = len(local_kms.calls)
    with pytest.raises(RpcError) as info:
        await restarted.unseal(gen1, min_generation=2)  # the caller recorded generation 2
    assert info.value.status is Status.FAILED_PRECONDITION
    assert "generation 1, older than generation 2" in info.value.message
    assert len(local_kms.calls) == calls  # refused before KMS was asked
    assert await restarted.list_keys() == []
    assert [k.key_id for k in await restarted.unseal(gen2, min_generation=2)] == [second.key_id]
    assert sealed_generation(await restarted.seal()) == 3  # continues after the unsealed one


async def test_a_forged_generation_does_not_authenticate(
    local_kms: LocalKms, test_attester: Any
) -> None:
    arn = local_kms.create_key()
    vault = make_vault(local_kms, test_attester, arn)
    await vault.create_key(KeyType.ED25519)
    sealed = bytearray(await vault.seal())
    sealed[5:13] = (7).to_bytes(8, "big")  # claims to be newer than it is
    with pytest.raises(RpcError) as info:
        await make_vault(local_kms, test_attester, arn).unseal(bytes(sealed), min_generation=5)
    assert info.value.status is Status.INVALID_ARGUMENT and "corrupt" in info.value.message


async def test_bad_min_generation_is_invalid(local_kms: LocalKms, test_attester: Any) -> None:
    vault = make_vault(local_kms, test_attester, local_kms.create_key())
    with pytest.raises(RpcError) as info:
        await vault.unseal(b"x", min_generation=-1)
    assert info.value.status is Status.INVALID_ARGUMENT
    assert info.value.details["param"] == "min_generation"


async def test_tampered_blob_is_refused(local_kms: LocalKms, test_attester: Any) -> None:
    arn = local_kms.create_key(alias="vault")
    vault = make_vault(local_kms, test_attester, arn)
    await vault.create_key(KeyType.ED25519)
    sealed = await vault.seal()
    fresh = make_vault(local_kms, test_attester, arn)
    # The AES-GCM body: KMS answers, the enclave's AEAD check refuses.
    body_flip = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(RpcError) as info:
        await fresh.unseal(body_flip)
    assert info.value.status is Status.INVALID_ARGUMENT and "corrupt" in info.value.message
    # The KMS blob: KMS refuses it.
    blob = SealedBlob.parse(sealed)
    kms_flip = bytearray(sealed)
    kms_flip[15 + len(blob.kms_blob) - 1] ^= 1
    with pytest.raises(RpcError) as info:
        await fresh.unseal(bytes(kms_flip))
    assert info.value.status is Status.INVALID_ARGUMENT
    assert info.value.details["kms_code"] == "InvalidCiphertextException"
    # Not a blob at all: refused before any KMS call.
    calls = len(local_kms.calls)
    v2 = b"VRKV\x02" + bytes(7) + b"\x01"
    junk_blobs = (b"", b"VRKV", b"XXXX\x02" + bytes(10), b"VRKV\x01" + bytes(40), v2 + bytes(40))
    for junk in junk_blobs:
        with pytest.raises(RpcError) as info:
            await fresh.unseal(junk)
        assert (
            info.value.status is Status.INVALID_ARGUMENT and info.value.details["param"] == "sealed"
        )
    assert len(local_kms.calls) == calls
    assert await fresh.list_keys() == []


async def test_kms_refusals_map_to_statuses(local_kms: LocalKms, test_attester: Any) -> None:
    arn = local_kms.create_key(alias="vault")
    vault = make_vault(local_kms, test_attester, arn)
    local_kms.refuse_next = KmsRequestError("AccessDeniedException", "key policy says no")
    with pytest.raises(RpcError) as info:
        await vault.seal()
    assert info.value.status is Status.PERMISSION_DENIED
    assert "key policy says no" in info.value.message
    local_kms.refuse_next = KmsRequestError("KMSInternalException", "oops", 500)
    with pytest.raises(RpcError) as info:
        await vault.seal()
    assert info.value.status is Status.UNAVAILABLE
    missing = make_vault(local_kms, test_attester, arn.replace(arn[-12:], "0" * 12))
    with pytest.raises(RpcError) as info:
        await missing.seal()
    assert info.value.status is Status.FAILED_PRECONDITION
    assert info.value.details["kms_code"] == "NotFoundException"


async def test_unattested_recipient_is_refused(local_kms: LocalKms, test_attester: Any) -> None:
    class Forger:
        """Puts the key in a document the KMS cannot verify."""

        def attest(self, *, public_key: bytes | None = None, **_: Any) -> bytes:
            return b"not an attestation document" + (public_key or b"")

    arn = local_kms.create_key(alias="vault")
    vault = KeyVaultImpl(sealer=KmsSealer(kms_client(local_kms), arn, Forger()))
    with pytest.raises(RpcError) as info:
        await vault.seal()
    assert info.value.details["kms_code"] == "ValidationException"
    assert "attestation document rejected" in info.value.message


async def test_debug_enclave_is_refused_by_strict_kms(test_attester: Any, tmp_path: Any) -> None:
    from services.keyvault.testing import attested_public_key
    from vrpc.attestation import InsecureTestAttester, Verifier

    debug = InsecureTestAttester(seed=b"keyvault-tests", debug=True, nsm_path=str(tmp_path / "n"))
    strict = Verifier(test_attester.policy(), test_attester.trust_root())
    async with LocalKms(recipient_check=attested_public_key(strict)) as kms:
        arn = kms.create_key(alias="vault")
        vault = KeyVaultImpl(sealer=KmsSealer(kms_client(kms), arn, debug))
        with pytest.raises(RpcError) as info:
            await vault.seal()
    assert "PolicyViolation" in info.value.message


async def test_kms_answer_with_plaintext_is_refused(
    local_kms: LocalKms, test_attester: Any
) -> None:
    # Something answering with the plaintext data key is not KMS honouring the Recipient.
    original = local_kms._generate_data_key

    def leaky(request: Any, recipient: Any, who: Any) -> dict[str, Any]:
        reply = original(request, recipient, who)
        reply["Plaintext"] = "AAAA"
        return reply

    local_kms._generate_data_key = leaky  # type: ignore[method-assign]
    local_kms.create_key(alias="vault")
    client: KmsClient = kms_client(local_kms)
    rsa_key = rsa.generate_private_key(65537, 2048).public_key()
    spki = rsa_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    document = test_attester.attest(public_key=spki)
    with pytest.raises(KmsError, match="plaintext"):
        await client.generate_data_key("alias/vault", attestation_document=document)


class PlainSealer:
    """Identity sealing behind an 8-byte generation: tests the vault's rules without KMS."""

    async def seal(self, plaintext: bytes, generation: int) -> bytes:
        return generation.to_bytes(8, "big") + plaintext

    def generation(self, blob: bytes) -> int:
        return int.from_bytes(blob[:8], "big")

    async def unseal(self, blob: bytes) -> tuple[int, bytes]:
        return self.generation(blob), blob[8:]


async def test_too_many_keys_in_a_store_loads_nothing() -> None:
    big = KeyVaultImpl(sealer=PlainSealer())
    for _ in range(2):
        await big.create_key(KeyType.ED25519)
    sealed = await big.seal()
    small = KeyVaultImpl(sealer=PlainSealer(), max_keys=1)
    with pytest.raises(RpcError) as err:
        await small.unseal(sealed)
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    assert await small.list_keys() == []


async def test_corrupt_store_inside_valid_seal_is_data_loss() -> None:
    vault = KeyVaultImpl(sealer=PlainSealer())
    with pytest.raises(RpcError) as err:
        # msgpack [7, []]: unknown store version
        await vault.unseal((1).to_bytes(8, "big") + b"\x92\x07\x90")
    assert err.value.status is Status.DATA_LOSS


def test_blob_layout() -> None:
    blob = SealedBlob.encrypt(bytes(32), b"kms-blob", b"payload", 258)
    magic, version, generation, n = struct.unpack_from(">4sBQH", blob)
    assert (magic, version, generation, n) == (b"VRKV", 2, 258, 8)
    assert blob[15:23] == b"kms-blob"
    assert len(blob) == 15 + 8 + 12 + len(b"payload") + 16
    assert SealedBlob.parse(blob).decrypt(bytes(32)) == b"payload"
    assert SealedBlob.parse(blob).generation == sealed_generation(blob) == 258
    for bad in (0, 1 << 63):
        with pytest.raises(SealedFormatError, match="generation"):
            SealedBlob.encrypt(bytes(32), b"kms-blob", b"payload", bad)
    with pytest.raises(ValueError, match="not a version 2"):
        sealed_generation(blob[:12])


ARN = "arn:aws:kms:eu-west-3:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_sealer_from_env() -> None:
    assert sealer_from_env(object(), {}) is None
    sealer = sealer_from_env(object(), {"VRPC_KMS_KEY_ID": ARN})
    assert isinstance(sealer, KmsSealer) and sealer.key_arn == ARN
    mrk = "arn:aws:kms:us-east-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"
    assert isinstance(sealer_from_env(object(), {"VRPC_KMS_KEY_ID": mrk}), KmsSealer)


@pytest.mark.parametrize(
    "key_id",
    [
        "alias/vrpc-keyvault",
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:eu-west-3:111122223333:alias/vrpc-keyvault",
        ARN + " ",
        ARN.upper(),
        ARN.replace("111122223333", "1111"),
    ],
)
def test_only_a_full_key_arn_is_accepted_at_start(key_id: str) -> None:
    with pytest.raises(KeyIdentityError, match="full key ARN"):
        sealer_from_env(object(), {"VRPC_KMS_KEY_ID": key_id})


def test_region_must_agree_with_the_arn() -> None:
    env = {"VRPC_KMS_KEY_ID": ARN, "VRPC_KMS_REGION": "us-east-1"}
    with pytest.raises(KeyIdentityError, match="eu-west-3"):
        sealer_from_env(object(), env)


@pytest.mark.parametrize("action", ["GenerateDataKey", "Decrypt"])
async def test_reply_for_another_key_is_refused(
    local_kms: LocalKms, test_attester: Any, action: str
) -> None:
    # Defence in depth: whatever answers, a reply naming another key seals/unseals nothing.
    arn = local_kms.create_key()
    other = local_kms.create_key()
    vault = make_vault(local_kms, test_attester, arn)
    await vault.create_key(KeyType.ED25519)
    sealed = await vault.seal() if action == "Decrypt" else b""
    local_kms.answer_key_id = other
    target = make_vault(local_kms, test_attester, arn)
    with pytest.raises(RpcError) as info:
        await (target.unseal(sealed) if action == "Decrypt" else target.seal())
    assert info.value.status is Status.FAILED_PRECONDITION
    assert f"KMS answered for key {other!r}" in info.value.message
    assert f"pinned to {arn!r}" in info.value.message
    assert await target.list_keys() == []
