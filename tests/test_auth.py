"""vrpc.auth: callers authenticated by signing the session's channel binding, roles per method."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import vrpc
from vrpc.auth import (
    ANY_CALLER,
    CONTEXT,
    METADATA_KEY_ID,
    METADATA_SIGNATURE,
    CallerAuthenticator,
    SessionSigner,
    TrustedCaller,
    current_caller,
    load_callers,
)

ADMIN = Ed25519PrivateKey.generate()
READER = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()


class Vault(vrpc.Service, name="authtest.v1"):
    runs: list[str] = []

    @vrpc.rpc
    async def wipe(self) -> str:
        caller = current_caller()
        assert caller is not None
        self.runs.append("wipe")
        return caller.key_id

    @vrpc.rpc
    async def read(self) -> list[str]:
        caller = current_caller()
        assert caller is not None
        self.runs.append("read")
        return sorted(caller.roles)

    @vrpc.rpc
    async def unlisted(self) -> None:
        self.runs.append("unlisted")

    @vrpc.rpc
    async def tail(self, n: int) -> AsyncIterator[str]:
        caller = current_caller()
        assert caller is not None
        for i in range(n):
            yield f"{caller.key_id}:{i}"


def authenticator() -> CallerAuthenticator:
    return CallerAuthenticator(
        [
            TrustedCaller("admin", ADMIN.public_key(), frozenset({"admin"})),
            TrustedCaller("reader", READER.public_key(), frozenset({"reader"})),
        ],
        method_roles={
            "authtest.v1.wipe": {"admin"},
            "authtest.v1.read": {ANY_CALLER},
            "authtest.v1.tail": {"admin"},
        },
    )


@pytest.fixture
def unix_uri(uri_on: Callable[[str, Path], str], tmp_path: Path) -> str:
    return uri_on("unix", tmp_path)


def signed(new_client: Callable[..., vrpc.Client], uri: str, key_id: str, key: Any) -> vrpc.Client:
    signer = SessionSigner(key_id, key)
    return signer.attach(new_client(uri, interceptors=[signer]))


async def expect(status: vrpc.Status, call: Any) -> str:
    with pytest.raises(vrpc.RpcError) as info:
        await call
    assert info.value.status is status, info.value
    return info.value.message


async def test_roles_decide_and_handlers_see_the_caller(
    server_at: Any, new_client: Any, unix_uri: str
) -> None:
    Vault.runs = []
    async with server_at(unix_uri, [Vault()], interceptors=[authenticator()]):
        async with signed(new_client, unix_uri, "admin", ADMIN) as admin:
            assert await admin.stub(Vault).wipe() == "admin"
            assert await admin.stub(Vault).read() == ["admin"]
        async with signed(new_client, unix_uri, "reader", READER) as reader:
            assert await reader.stub(Vault).read() == ["reader"]
            message = await expect(vrpc.Status.PERMISSION_DENIED, reader.stub(Vault).wipe())
            assert message == "caller 'reader' may not call authtest.v1.wipe (needs role admin)"
            message = await expect(vrpc.Status.PERMISSION_DENIED, reader.stub(Vault).unlisted())
            assert message == "no rule allows authtest.v1.unlisted"
    assert Vault.runs == ["wipe", "read", "read"]  # refused calls never reached a handler


async def test_streaming_calls_are_signed_too(
    server_at: Any, new_client: Any, unix_uri: str
) -> None:
    async with server_at(unix_uri, [Vault()], interceptors=[authenticator()]):
        async with signed(new_client, unix_uri, "admin", ADMIN) as admin:
            assert [line async for line in admin.stub(Vault).tail(2)] == ["admin:0", "admin:1"]
        async with signed(new_client, unix_uri, "reader", READER) as reader:
            with pytest.raises(vrpc.RpcError) as denied:
                [line async for line in reader.stub(Vault).tail(2)]
            assert denied.value.status is vrpc.Status.PERMISSION_DENIED
        async with new_client(unix_uri) as anonymous:
            with pytest.raises(vrpc.RpcError) as refused:
                [line async for line in anonymous.stub(Vault).tail(2)]
            assert refused.value.status is vrpc.Status.UNAUTHENTICATED


async def test_unauthenticated_calls_are_refused_before_the_handler(
    server_at: Any, new_client: Any, unix_uri: str
) -> None:
    Vault.runs = []
    async with server_at(unix_uri, [Vault()], interceptors=[authenticator()]):
        async with new_client(unix_uri) as anonymous:
            message = await expect(vrpc.Status.UNAUTHENTICATED, anonymous.stub(Vault).read())
            assert "needs an authenticated caller" in message and METADATA_KEY_ID in message
            # The health check stays public.
            assert await anonymous.call("vrpc.health.check", [""]) == "SERVING"
            garbage = {METADATA_KEY_ID: "admin", METADATA_SIGNATURE: "not bytes"}
            message = await expect(
                vrpc.Status.UNAUTHENTICATED,
                anonymous.call("authtest.v1.read", [], metadata=garbage),
            )
            assert message == "caller credentials are malformed"
        async with signed(new_client, unix_uri, "nobody", STRANGER) as unknown:
            message = await expect(vrpc.Status.UNAUTHENTICATED, unknown.stub(Vault).read())
            assert message == "unknown caller key 'nobody'"
        async with signed(new_client, unix_uri, "admin", STRANGER) as impostor:
            message = await expect(vrpc.Status.UNAUTHENTICATED, impostor.stub(Vault).wipe())
            assert "signature does not match this session's channel binding" in message
    assert Vault.runs == []


async def test_a_signature_is_worth_nothing_on_another_session(
    server_at: Any, new_client: Any, unix_uri: str
) -> None:
    async with (
        server_at(unix_uri, [Vault()], interceptors=[authenticator()]),
        new_client(unix_uri) as first,
        new_client(unix_uri) as second,
    ):
        stolen = {
            METADATA_KEY_ID: "admin",
            METADATA_SIGNATURE: ADMIN.sign(CONTEXT + first.channel_binding),
        }
        assert await first.call("authtest.v1.wipe", [], metadata=stolen) == "admin"
        message = await expect(
            vrpc.Status.UNAUTHENTICATED,
            second.call("authtest.v1.wipe", [], metadata=stolen),
        )
        assert "does not match this session's channel binding" in message
        # Without the domain-separation prefix the signature is refused too.
        bare = {**stolen, METADATA_SIGNATURE: ADMIN.sign(second.channel_binding)}
        await expect(
            vrpc.Status.UNAUTHENTICATED, second.call("authtest.v1.wipe", [], metadata=bare)
        )


async def test_plaintext_sessions_cannot_authenticate(
    server_at: Any, unix_uri: str, attester: Any
) -> None:
    async with server_at(unix_uri, [Vault()], interceptors=[authenticator()], allow_plaintext=True):
        signer = SessionSigner("admin", ADMIN)
        client = signer.attach(vrpc.connect(unix_uri, plaintext=True, interceptors=[signer]))
        async with client:
            message = await expect(vrpc.Status.UNAUTHENTICATED, client.stub(Vault).read())
            assert message == "caller authentication needs an attested session (no channel binding)"


class CountingKey:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.signed: list[bytes] = []

    def sign(self, data: bytes) -> bytes:
        self.signed.append(data)
        return self.key.sign(data)


async def test_one_signature_per_session(server_at: Any, new_client: Any, unix_uri: str) -> None:
    key = CountingKey(ADMIN)
    async with (
        server_at(unix_uri, [Vault()], interceptors=[authenticator()]),
        signed(new_client, unix_uri, "admin", key) as admin,
    ):
        for _ in range(5):
            await admin.stub(Vault).read()
        assert key.signed == [CONTEXT + admin.channel_binding]


class FakeClient:
    """A client whose session changes under the first call (a reconnect)."""

    def __init__(self) -> None:
        self.channel_binding = b"\x01" * 48

    async def connect(self) -> None:
        pass


async def test_a_call_signed_for_a_replaced_session_is_signed_again() -> None:
    client = FakeClient()
    signer = SessionSigner("admin", ADMIN)
    signer.attach(client)  # type: ignore[arg-type]
    sent: list[bytes] = []
    metadata: dict[str, Any] = {}

    async def call_next() -> str:
        sent.append(metadata[METADATA_SIGNATURE])
        if len(sent) == 1:
            client.channel_binding = b"\x02" * 48  # reconnected before the call went out
            raise vrpc.RpcError(vrpc.Status.UNAUTHENTICATED, "stale")
        return "ok"

    assert await signer.intercept("authtest.v1.read", metadata, call_next) == "ok"
    assert sent == [ADMIN.sign(CONTEXT + b"\x01" * 48), ADMIN.sign(CONTEXT + b"\x02" * 48)]

    # The same session: an UNAUTHENTICATED answer is final, not retried.
    async def refuse() -> str:
        raise vrpc.RpcError(vrpc.Status.UNAUTHENTICATED, "no")

    with pytest.raises(vrpc.RpcError):
        await signer.intercept("authtest.v1.read", {}, refuse)


async def test_an_unattached_signer_says_so() -> None:
    async def call_next() -> None:
        raise AssertionError("must not be called")

    with pytest.raises(RuntimeError, match=r"signer.attach\(client\)"):
        await SessionSigner("admin", ADMIN).intercept("m", {}, call_next)


def raw_public(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def test_load_callers() -> None:
    callers = load_callers(
        {"callers": [{"key_id": "ops", "public_key": raw_public(ADMIN), "roles": ["admin"]}]}
    )
    assert [(c.key_id, c.roles) for c in callers] == [("ops", frozenset({"admin"}))]
    entry = {"key_id": "ops", "public_key": raw_public(ADMIN), "roles": ["admin"]}
    for bad, message in [
        ([], "must be an object"),
        ({"callers": [{**entry, "extra": 1}]}, "exactly key_id, public_key and roles"),
        ({"callers": [{**entry, "key_id": ""}]}, "key_id must be"),
        ({"callers": [{**entry, "public_key": "AAAA"}]}, "not a base64 Ed25519 public key"),
        ({"callers": [{**entry, "roles": "admin"}]}, "roles must be a list"),
        ({"callers": [entry, entry]}, "listed twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_callers(bad)
