"""The parent instance against keyvault: it cannot obtain plaintext, substitute a store, roll one
back, call administrative methods, or split the KMS request through the credentials it serves.

The parent relays every byte, supplies the enclave's AWS credentials, holds the instance role,
runs enclaves of its own (other images, debug mode), owns an AWS account of its own, and reaches
the keyvault's port. Here it plays all of that against:

* the local KMS (``services.keyvault.testing.LocalKms``) holding the key with the committed
  policy template ``deploy/kms-key-policy.json`` filled in for this build's PCR0;
* the production server composition (``services.keyvault.impl.create_server``: caller
  authentication, key use checked per key) with the sealer pinned to the key's full ARN.

What LocalKms cannot model, and so this test does not prove: TLS between the enclave and KMS (the
local KMS speaks HTTP on loopback; in production the parent sees only TLS records), IAM policy
conditions, service control policies, grants, and the AWS root of trust for attestation
documents (the insecure test root stands in for it; KMS itself pins no PCR, the key policy does).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from keyvault_helpers import kms_client

import vrpc
from services.keyvault import KeyType, KeyVault
from services.keyvault.impl import create_server, sealer_from_env
from services.keyvault.keypolicy import TEMPLATE, render_key_policy
from services.keyvault.kms import AwsCredentials, KmsError, StaticCredentials
from services.keyvault.sealing import (
    ENCRYPTION_CONTEXT,
    KeyIdentityError,
    KmsSealer,
    SealedBlob,
)
from services.keyvault.store import dump_keys, generate
from services.keyvault.testing import LocalKms, Principal, attested_public_key
from vrpc.auth import SessionSigner, TrustedCaller
from vrpc.status import Status

ACCOUNT = "111122223333"
PARENT_ACCOUNT = "444455556666"  # an account the parent's operator controls


@dataclasses.dataclass
class World:
    kms: LocalKms
    key_arn: str
    attester: Any
    uri: str
    admin_key: Ed25519PrivateKey
    app_key: Ed25519PrivateKey
    callers: list[TrustedCaller]
    parent_own: Principal  # the parent's credentials in its own account
    parent_key: str  # a key the parent controls, in its own account
    servers: list[vrpc.Server]

    def sealer(self, principal: Principal | None = None) -> KmsSealer:
        who = principal or self.kms.principal
        creds = AwsCredentials(who.access_key_id, who.secret_access_key, who.session_token)
        client = kms_client(self.kms, credentials=StaticCredentials(creds))
        return KmsSealer(client, self.key_arn, self.attester)

    async def start_enclave(self, principal: Principal | None = None) -> vrpc.Server:
        """A fresh enclave (empty vault), e.g. after a restart."""
        for server in self.servers:
            await server.close(grace=0)
        server = create_server(
            attester=self.attester, callers=self.callers, sealer=self.sealer(principal)
        )
        await server.start(self.uri)
        self.servers = [server]
        return server

    def connect(self, signer: SessionSigner | None = None) -> vrpc.Client:
        policy, root = self.attester.policy(), self.attester.trust_root()
        interceptors = [signer] if signer is not None else []
        client = vrpc.connect(self.uri, policy=policy, root=root, interceptors=interceptors)
        return signer.attach(client) if signer is not None else client

    def admin(self) -> vrpc.Client:
        return self.connect(SessionSigner("ops-admin", self.admin_key))

    def app(self) -> vrpc.Client:
        return self.connect(SessionSigner("payments", self.app_key))


@pytest.fixture
async def world(test_attester: Any, tmp_path: Path) -> AsyncIterator[World]:
    # KMS accepts any genuine attestation document (it pins no PCR itself, debug mode included);
    # the key policy decides. The insecure test root stands in for the AWS Nitro root.
    kms_view = vrpc.Verifier(vrpc.Policy(allow_debug=True), test_attester.trust_root())
    async with LocalKms(recipient_check=attested_public_key(kms_view), account=ACCOUNT) as kms:
        admin_role = kms.add_principal(ACCOUNT, "vrpc-key-admin")
        policy = render_key_policy(
            json.loads(TEMPLATE.read_text()),
            image_sha384=test_attester.policy().pcrs[0].hex(),
            enclave_role_arn=kms.principal.arn,  # the parent instance's role
            key_admin_role_arn=admin_role.arn,
        )
        key_arn = kms.create_key(policy=policy)
        parent_own = kms.add_principal(PARENT_ACCOUNT, "parent-own")
        parent_key = kms.create_key(alias="vrpc-keyvault", account=PARENT_ACCOUNT)
        admin_key, app_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        callers = [
            TrustedCaller("ops-admin", admin_key.public_key(), frozenset({"admin"})),
            TrustedCaller("payments", app_key.public_key(), frozenset({"signer:*"})),
        ]
        world = World(
            kms,
            key_arn,
            test_attester,
            f"unix://{tmp_path}/keyvault.sock",
            admin_key,
            app_key,
            callers,
            parent_own,
            parent_key,
            [],
        )
        await world.start_enclave()
        try:
            yield world
        finally:
            for server in world.servers:
                await server.close(grace=0)


def as_parent(world: World, principal: Principal | None = None) -> Any:
    """A KMS client with the parent's credentials (the instance role unless told otherwise)."""
    who = principal or world.kms.principal
    creds = AwsCredentials(who.access_key_id, who.secret_access_key, who.session_token)
    return kms_client(world.kms, credentials=StaticCredentials(creds))


async def kms_refusal(call: Any) -> KmsError:
    with pytest.raises(KmsError) as info:
        await call
    return info.value


def recipient(attester: Any) -> dict[str, str]:
    key = rsa.generate_private_key(65537, 2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    document = attester.attest(public_key=spki)
    return {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": base64.b64encode(document).decode(),
    }


async def rpc_refusal(call: Any) -> vrpc.RpcError:
    with pytest.raises(vrpc.RpcError) as info:
        await call
    return info.value


async def sealed_store(world: World) -> tuple[bytes, str]:
    async with world.admin() as admin:
        info = await admin.stub(KeyVault).create_key(KeyType.ED25519, "treasury")
        return await admin.stub(KeyVault).seal(), info.key_id


async def test_parent_cannot_obtain_plaintext(world: World, tmp_path: Path) -> None:
    sealed, _ = await sealed_store(world)
    blob = base64.b64encode(SealedBlob.parse(sealed).kms_blob).decode()
    context = dict(ENCRYPTION_CONTEXT)
    parent = as_parent(world)

    # Decrypt the stored data key without a Recipient, with the instance role (whose IAM policy
    # allows kms:*): KMS would return the plaintext if the policy allowed it. It denies.
    err = await kms_refusal(
        parent.call("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": context})
    )
    assert err.code == "AccessDeniedException"
    assert "explicit deny in the key policy (statement DenyPlaintextOutsideTheMeasuredEnclave)" in (
        err.message
    )
    # A fresh data key without a Recipient: the same.
    request = {"KeyId": world.key_arn, "KeySpec": "AES_256", "EncryptionContext": context}
    err = await kms_refusal(parent.call("GenerateDataKey", request))
    assert err.code == "AccessDeniedException" and "explicit deny" in err.message

    # With a genuine attestation document from an enclave of its own: another image, or a
    # debug-mode enclave. Both verify under the root; the key policy denies both.
    other_image = vrpc.InsecureTestAttester(
        seed=b"keyvault-tests", pcrs={0: b"\x11" * 48}, nsm_path=str(tmp_path / "nsm")
    )
    debug = vrpc.InsecureTestAttester(
        seed=b"keyvault-tests", debug=True, nsm_path=str(tmp_path / "nsm")
    )
    for enclave in (other_image, debug):
        err = await kms_refusal(
            parent.call(
                "Decrypt",
                {
                    "CiphertextBlob": blob,
                    "EncryptionContext": context,
                    "Recipient": recipient(enclave),
                },
            )
        )
        assert err.code == "AccessDeniedException" and "explicit deny" in err.message

    # Its own account's credentials, naming the key by ARN: not in the key policy at all.
    own = as_parent(world, world.parent_own)
    err = await kms_refusal(
        own.call("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": context})
    )
    assert err.code == "AccessDeniedException" and "not authorized" in err.message

    # Re-wrapping or delegating the key: denied to everyone.
    for action, body in [
        ("ReEncrypt", {"KeyId": world.key_arn, "CiphertextBlob": blob}),
        ("CreateGrant", {"KeyId": world.key_arn}),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": world.key_arn}),
    ]:
        err = await kms_refusal(parent.call(action, body))
        assert err.code == "AccessDeniedException" and "explicit deny" in err.message, action


async def test_parent_cannot_substitute_a_store(world: World) -> None:
    # The parent builds a store holding a key it knows, under a data key it knows. In its own
    # account KMS happily returns plaintext data keys (default key policy).
    own = as_parent(world, world.parent_own)
    reply = await own.call(
        "GenerateDataKey",
        {
            "KeyId": "alias/vrpc-keyvault",
            "KeySpec": "AES_256",
            "EncryptionContext": dict(ENCRYPTION_CONTEXT),
        },
    )
    assert reply["KeyId"] == world.parent_key
    data_key = base64.b64decode(reply["Plaintext"])
    planted = generate(KeyType.ED25519, "planted", 0)
    forged = SealedBlob.encrypt(
        data_key, base64.b64decode(reply["CiphertextBlob"]), dump_keys([planted]), 99
    )
    # Even the administrator, tricked into unsealing it, loads nothing: the enclave asks KMS for
    # its pinned key, and the blob was made under another one.
    async with world.admin() as admin:
        err = await rpc_refusal(admin.stub(KeyVault).unseal(forged))
        assert err.status is Status.INVALID_ARGUMENT
        assert err.details["kms_code"] == "IncorrectKeyException"
        assert await admin.stub(KeyVault).list_keys() == []

    # Wrapping a known data key under the pinned key (Encrypt) would make a store the enclave
    # accepts: denied.
    err = await kms_refusal(
        as_parent(world).call(
            "Encrypt",
            {
                "KeyId": world.key_arn,
                "Plaintext": base64.b64encode(data_key).decode(),
                "EncryptionContext": dict(ENCRYPTION_CONTEXT),
            },
        )
    )
    assert err.code == "AccessDeniedException" and "DenyWrappingAndDelegation" in err.message

    # Handing the enclave its own account's credentials: the pinned ARN names the real key, so
    # KMS refuses the request instead of sealing under a key the parent controls.
    await world.start_enclave(world.parent_own)
    async with world.admin() as admin:
        await admin.stub(KeyVault).create_key(KeyType.ED25519)
        err = await rpc_refusal(admin.stub(KeyVault).seal())
        assert err.status is Status.PERMISSION_DENIED
        assert err.details["kms_code"] == "AccessDeniedException"

    # An image built with an alias (resolved in the credentials' account) never starts.
    with pytest.raises(KeyIdentityError, match="full key ARN"):
        sealer_from_env(world.attester, {"VRPC_KMS_KEY_ID": "alias/vrpc-keyvault"})


async def test_parent_cannot_roll_back(world: World) -> None:
    async with world.admin() as admin:
        vault = admin.stub(KeyVault)
        old_key = await vault.create_key(KeyType.ED25519, "compromised")
        generation_1 = await vault.seal()
        await vault.delete_key(old_key.key_id)
        kept = await vault.create_key(KeyType.ED25519, "current")
        generation_2 = await vault.seal()
        # A running enclave never unseals, whoever asks.
        err = await rpc_refusal(vault.unseal(generation_1))
        assert err.status is Status.FAILED_PRECONDITION and "only allowed at start" in err.message

    await world.start_enclave()  # restart: the parent hands over the older blob
    async with world.connect() as parent:
        err = await rpc_refusal(parent.stub(KeyVault).unseal(generation_1))
        assert err.status is Status.UNAUTHENTICATED
    async with world.admin() as admin:
        # The administrator recorded generation 2 (sealed_generation) and says so.
        err = await rpc_refusal(admin.stub(KeyVault).unseal(generation_1, min_generation=2))
        assert err.status is Status.FAILED_PRECONDITION
        assert "generation 1, older than generation 2" in err.message
        restored = await admin.stub(KeyVault).unseal(generation_2, min_generation=2)
        assert [k.key_id for k in restored] == [kept.key_id]

    # The residual risk at boot (docs/deployment.md): an enclave that is told no generation
    # cannot know a newer one exists, and loads the old store.
    await world.start_enclave()
    async with world.admin() as admin:
        loaded = await admin.stub(KeyVault).unseal(generation_1)
        assert [k.key_id for k in loaded] == [old_key.key_id]


async def test_parent_cannot_call_administrative_methods(world: World) -> None:
    async with world.admin() as admin:
        signing = await admin.stub(KeyVault).create_key(KeyType.ED25519)
    async with world.connect() as parent:
        vault = parent.stub(KeyVault)
        for call in (
            vault.create_key(KeyType.ED25519),
            vault.delete_key(signing.key_id),
            vault.seal(),
            vault.unseal(b"VRKV"),
            vault.sign(signing.key_id, b"transfer everything"),
            vault.list_keys(),
        ):
            err = await rpc_refusal(call)
            assert err.status is Status.UNAUTHENTICATED
            assert "needs an authenticated caller" in err.message
    # Claiming the administrator's key id with a key of its own.
    impostor = SessionSigner("ops-admin", Ed25519PrivateKey.generate())
    async with world.connect(impostor) as parent:
        err = await rpc_refusal(parent.stub(KeyVault).delete_key(signing.key_id))
        assert err.status is Status.UNAUTHENTICATED
        assert "signature does not match this session's channel binding" in err.message
    # The application's key signs, and administers nothing.
    async with world.app() as app:
        vault = app.stub(KeyVault)
        assert len(await vault.sign(signing.key_id, b"m")) == 64
        for call in (vault.delete_key(signing.key_id), vault.seal(), vault.create_key("ed25519")):
            err = await rpc_refusal(call)
            assert err.status is Status.PERMISSION_DENIED
            assert "may not call keyvault.v1." in err.message and "needs role admin" in err.message
    async with world.admin() as admin:
        assert [k.key_id for k in await admin.stub(KeyVault).list_keys()] == [signing.key_id]


@pytest.mark.parametrize(
    "token", ["tok\r\nX-Amz-Target: TrentService.Encrypt", "t\u00f6ken", "tok\nHost: evil"]
)
async def test_parent_credentials_cannot_split_the_kms_request(world: World, token: str) -> None:
    # The parent serves the credentials; a session token with CR/LF would split the request
    # inside TLS, a non-latin-1 one used to end in an uncaught UnicodeEncodeError.
    forged = dataclasses.replace(world.kms.principal, session_token=token)
    await world.start_enclave(forged)
    calls = len(world.kms.calls)
    async with world.admin() as admin:
        await admin.stub(KeyVault).create_key(KeyType.ED25519)
        err = await rpc_refusal(admin.stub(KeyVault).seal())
        assert err.status is Status.FAILED_PRECONDITION
        assert err.details["kms_code"] == "InvalidCredentials"
        assert "session token has characters AWS never issues" in err.message
        assert token not in err.message
    assert len(world.kms.calls) == calls  # nothing was sent to KMS
