"""The in-enclave forward and the parent credentials provider, over loopback TCP only."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from keyvault_helpers import kms_client

from services.keyvault import KeyType
from services.keyvault.credentials import (
    REQUEST,
    CredentialsError,
    ParentCredentials,
    decode_credentials,
    encode_credentials,
    handle_client,
)
from services.keyvault.forward import EnclaveForward, ensure_loopback_up, tcp_connector
from services.keyvault.impl import KeyVaultImpl
from services.keyvault.kms import AwsCredentials, KmsError
from services.keyvault.sealing import KmsSealer
from services.keyvault.testing import LocalKms


async def _serve(handler: Callable[..., Any]) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_forward_relays_bytes_both_ways() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server, port = await _serve(echo)
    async with server:
        forward = EnclaveForward(tcp_connector("127.0.0.1", port), port=0)
        host, fport = await forward.address()
        assert (host, fport) == ("127.0.0.1", fport) and fport not in (0, port)
        reader, writer = await asyncio.open_connection(host, fport)
        payload = b"abc" * 100_000
        writer.write(payload)
        writer.write_eof()
        assert await reader.read() == payload.upper()
        writer.close()
        await writer.wait_closed()
        await forward.aclose()


async def test_forward_survives_upstream_failure() -> None:
    server, port = await _serve(lambda r, w: w.close())
    server.close()
    await server.wait_closed()  # nothing listens on `port` now
    forward = EnclaveForward(tcp_connector("127.0.0.1", port), port=0)
    host, fport = await forward.address()
    for _ in range(2):
        reader, writer = await asyncio.open_connection(host, fport)
        assert await reader.read() == b""  # dropped, not hung
        writer.close()
    await forward.aclose()


async def test_sealing_through_the_forward(test_attester: Any, local_kms: LocalKms) -> None:
    # The enclave's route to KMS: client -> 127.0.0.1 forward -> (vsock in production) -> KMS.
    arn = local_kms.create_key(alias="vault")
    forward = EnclaveForward(tcp_connector("127.0.0.1", local_kms.port), port=0)
    client = kms_client(local_kms, route=forward)
    vault = KeyVaultImpl(sealer=KmsSealer(client, arn, test_attester))
    key = await vault.create_key(KeyType.ED25519)
    sealed = await vault.seal()
    fresh = KeyVaultImpl(sealer=KmsSealer(client, arn, test_attester))
    assert await fresh.unseal(sealed) == [key]
    await forward.aclose()


def test_loopback_is_up_here() -> None:
    # Only reads the interface flags on a machine whose loopback is up already.
    assert ensure_loopback_up() is False


CREDS = AwsCredentials("AKIAPARENT", "parent-secret", "session-token", 2_000_000_000.0)


@pytest.fixture
async def parent() -> AsyncIterator[tuple[int, list[int]]]:
    served: list[int] = []

    def source() -> AwsCredentials:
        served.append(1)
        return CREDS

    server, port = await _serve(lambda r, w: handle_client(source, r, w))
    async with server:
        yield port, served


async def test_parent_credentials_are_fetched_and_cached(parent: tuple[int, list[int]]) -> None:
    port, served = parent
    now = [1_000_000_000.0]
    provider = ParentCredentials(tcp_connector("127.0.0.1", port), clock=lambda: now[0])
    assert await provider.credentials() == CREDS
    assert await provider.credentials() == CREDS
    assert len(served) == 1
    now[0] = CREDS.expiration_epoch - 60  # type: ignore[operator]
    await provider.credentials()
    assert len(served) == 2  # refreshed before expiry
    assert "parent-secret" not in repr(CREDS)


async def test_kms_with_parent_credentials(parent: tuple[int, list[int]]) -> None:
    port, _ = parent
    async with LocalKms(
        recipient_check=lambda d: d,
        access_key_id=CREDS.access_key_id,
        secret_access_key=CREDS.secret_access_key,
        session_token=CREDS.session_token,
    ) as kms:
        client = kms_client(kms, credentials=ParentCredentials(tcp_connector("127.0.0.1", port)))
        with pytest.raises(KmsError) as info:
            await client.call("GenerateDataKey", {})
        # Signature and token accepted; refused only for the missing KeyId.
        assert info.value.code == "ValidationException" and "KeyId" in info.value.message


async def test_parent_ignores_bad_requests(parent: tuple[int, list[int]]) -> None:
    port, served = parent
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GIVE-ME-KEYS!")
    assert await reader.read() == b""
    writer.close()
    assert served == []


async def test_bad_parent_replies_raise() -> None:
    async def liar(reply: bytes) -> CredentialsError:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(len(REQUEST))
            writer.write(reply)
            await writer.drain()
            writer.close()

        server, port = await _serve(handler)
        async with server:
            with pytest.raises(CredentialsError) as info:
                await ParentCredentials(tcp_connector("127.0.0.1", port)).credentials()
        return info.value

    assert "too large" in str(await liar(struct.pack(">I", 1 << 20)))
    assert "closed" in str(await liar(struct.pack(">I", 10) + b"{}"))
    assert "JSON" in str(await liar(struct.pack(">I", 3) + b"{x}"))
    assert "AccessKeyId" in str(await liar(struct.pack(">I", 2) + b"{}"))


def test_credentials_codec() -> None:
    assert decode_credentials(encode_credentials(CREDS)[4:]) == CREDS
    for bad in (b"[]", b'{"AccessKeyId":"a","SecretAccessKey":"b","Token":1}',
                b'{"AccessKeyId":"a","SecretAccessKey":"b","Expiration":"soon"}'):  # fmt: skip
        with pytest.raises(CredentialsError):
            decode_credentials(bad)
