"""The KMS client (SigV4, HTTP/1.1) against the local KMS server, and the server's checks."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from keyvault_helpers import kms_client

from services.keyvault.cms import open_envelope
from services.keyvault.kms import KmsClient, KmsError, TcpRoute, read_response
from services.keyvault.testing import LocalKms, sigv4_signature


def spki_of(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def plain_recipient(document: bytes) -> bytes:
    """A recipient check without attestation: the 'document' is the SPKI itself."""
    return document


def test_sigv4_matches_aws_test_suite_vector() -> None:
    # AWS SigV4 test suite, "get-vanilla".
    signature = sigv4_signature(
        secret="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        method="GET",
        path="/",
        headers={"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"},
        signed_headers=["host", "x-amz-date"],
        body=b"",
        amz_date="20150830T123600Z",
        scope="20150830/us-east-1/service/aws4_request",
    )
    assert signature == "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"


async def test_generate_and_decrypt_roundtrip() -> None:
    key = rsa.generate_private_key(65537, 2048)
    async with LocalKms(recipient_check=plain_recipient, session_token="tok") as kms:
        arn = kms.create_key(alias="a")
        client = kms_client(kms)
        data_key = await client.generate_data_key(
            "alias/a", attestation_document=spki_of(key), encryption_context={"k": "v"}
        )
        assert data_key.key_id == arn
        plaintext = open_envelope(data_key.ciphertext_for_recipient, key)
        assert len(plaintext) == 32
        answer = await client.decrypt(
            data_key.ciphertext_blob,
            attestation_document=spki_of(key),
            key_id=arn,
            encryption_context={"k": "v"},
        )
        assert answer.key_id == arn
        assert open_envelope(answer.ciphertext_for_recipient, key) == plaintext
        with pytest.raises(KmsError) as info:
            await client.decrypt(data_key.ciphertext_blob, attestation_document=spki_of(key))
        assert info.value.code == "InvalidCiphertextException"  # context is bound
        assert info.value.http_status == 400 and not info.value.retryable
        signed = kms.calls[0].headers["authorization"].split("SignedHeaders=")[1].split(",")[0]
        assert "x-amz-security-token" in signed.split(";")
        assert kms.calls[0].headers["x-amz-target"] == "TrentService.GenerateDataKey"


async def _refusal(kms: LocalKms, **overrides: Any) -> KmsError:
    key = rsa.generate_private_key(65537, 2048)
    with pytest.raises(KmsError) as info:
        await kms_client(kms, **overrides).generate_data_key(
            "alias/a", attestation_document=spki_of(key)
        )
    return info.value


async def test_server_recomputes_the_signature() -> None:
    from services.keyvault.kms import AwsCredentials, StaticCredentials

    async with LocalKms(recipient_check=plain_recipient) as kms:
        kms.create_key(alias="a")
        wrong_secret = StaticCredentials(AwsCredentials(kms.access_key_id, "not-the-secret"))
        err = await _refusal(kms, credentials=wrong_secret)
        assert err.code == "InvalidSignatureException"
        unknown = StaticCredentials(AwsCredentials("AKIAUNKNOWN", kms.secret_access_key))
        assert (await _refusal(kms, credentials=unknown)).code == "UnrecognizedClientException"
        assert (await _refusal(kms, region="us-west-2")).code == "InvalidSignatureException"
        assert kms.calls == []


async def test_server_requires_the_session_token() -> None:
    async with LocalKms(recipient_check=plain_recipient, session_token="right") as kms:
        kms.create_key(alias="a")
        from services.keyvault.kms import AwsCredentials, StaticCredentials

        creds = AwsCredentials(kms.access_key_id, kms.secret_access_key, "wrong")
        err = await _refusal(kms, credentials=StaticCredentials(creds))
        assert err.code == "UnrecognizedClientException"


async def test_server_refuses_stale_requests() -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    async with LocalKms(recipient_check=plain_recipient, clock=lambda: later) as kms:
        kms.create_key(alias="a")
        err = await _refusal(kms)
        assert err.code == "InvalidSignatureException" and "expired" in err.message


async def test_server_detects_a_tampered_body() -> None:
    async with LocalKms(recipient_check=plain_recipient) as kms:
        client = kms_client(kms)
        headers = client._sign("Decrypt", b'{"a":1}', await client._credentials.credentials())
        status, body = await _raw(kms, headers, b'{"a":2}')
        assert status == 400 and b"InvalidSignatureException" in body
        status, body = await _raw(kms, {**headers, "X-Amz-Target": "TrentService.ListKeys"}, b"{}")
        assert status == 400 and b"UnknownOperationException" in body
        status, body = await _raw(kms, {**headers, "Content-Type": "application/json"}, b"{}")
        assert status == 400 and b"SerializationException" in body
        no_auth = {k: v for k, v in headers.items() if k != "Authorization"}
        status, body = await _raw(kms, no_auth, b'{"a":1}')
        assert status == 400 and b"IncompleteSignatureException" in body


async def _raw(kms: LocalKms, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", kms.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST / HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    try:
        return await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_without_recipient_the_plaintext_comes_back_when_the_policy_allows() -> None:
    # What real KMS does under the default key policy (IAM delegation): the reason the enclave's
    # key needs the policy in deploy/kms-key-policy.json.
    async with LocalKms(recipient_check=plain_recipient) as kms:
        arn = kms.create_key(alias="a")
        reply = await kms_client(kms).call(
            "GenerateDataKey", {"KeyId": "alias/a", "KeySpec": "AES_256"}
        )
        assert reply["KeyId"] == arn and len(base64.b64decode(reply["Plaintext"])) == 32
        again = await kms_client(kms).call("Decrypt", {"CiphertextBlob": reply["CiphertextBlob"]})
        assert again["Plaintext"] == reply["Plaintext"] and "CiphertextForRecipient" not in again


async def test_small_rsa_recipient_is_refused() -> None:
    key = rsa.generate_private_key(65537, 1024)
    async with LocalKms(recipient_check=plain_recipient) as kms:
        kms.create_key(alias="a")
        with pytest.raises(KmsError, match="RSA >= 2048"):
            await kms_client(kms).generate_data_key("alias/a", attestation_document=spki_of(key))


async def test_unreachable_endpoint_is_a_retryable_transport_error() -> None:
    async with LocalKms(recipient_check=plain_recipient) as kms:
        port = kms.port
    client = kms_client(kms, route=TcpRoute("127.0.0.1", port))
    with pytest.raises(KmsError) as info:
        await client.call("Decrypt", {})
    assert info.value.code == "TransportError" and info.value.retryable


async def test_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Never answers; returns once the client gives up and closes.
        while await reader.read(1 << 16):
            pass
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        from services.keyvault.kms import AwsCredentials, StaticCredentials

        client = KmsClient(
            endpoint=f"http://127.0.0.1:{port}",
            region="eu-west-1",
            credentials=StaticCredentials(AwsCredentials("AKIA", "s")),
            timeout=0.2,
            allow_insecure_http=True,
        )
        with pytest.raises(KmsError, match="timed out"):
            await client.call("Decrypt", {})


def test_endpoint_must_be_https() -> None:
    from services.keyvault.kms import AwsCredentials, StaticCredentials

    for endpoint in ("kms.eu-west-1.amazonaws.com", "http://kms.eu-west-1.amazonaws.com"):
        with pytest.raises(ValueError, match="https"):
            KmsClient(
                endpoint=endpoint,
                region="eu-west-1",
                credentials=StaticCredentials(AwsCredentials("a", "b")),
            )
    env = {
        "VRPC_KMS_KEY_ID": "arn:aws:kms:eu-west-1:111122223333:key/"
        + "1" * 8
        + "-1111" * 3
        + "-"
        + "1" * 12,
        "VRPC_KMS_ENDPOINT": "http://kms.eu-west-1.amazonaws.com",
    }
    from services.keyvault.impl import sealer_from_env

    with pytest.raises(ValueError, match="must be https"):
        sealer_from_env(object(), env)  # the enclave refuses to start


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("session_token", "tok\r\nX-Amz-Target: TrentService.Encrypt", "session token"),
        ("session_token", "t\u00f6ken", "session token"),  # not latin-1 safe: no UnicodeEncodeError
        ("session_token", "", "session token"),
        ("access_key_id", "AKIA\nX", "access key id"),
        ("access_key_id", "AKIA KEY", "access key id"),
        ("secret_access_key", "", "secret access key"),
    ],
)
async def test_parent_credentials_cannot_inject_headers(
    field: str, value: str, message: str
) -> None:
    import dataclasses

    from services.keyvault.kms import AwsCredentials, StaticCredentials

    async with LocalKms(recipient_check=plain_recipient) as kms:
        good = AwsCredentials(kms.access_key_id, kms.secret_access_key, "tok")
        bad = dataclasses.replace(good, **{field: value})
        with pytest.raises(KmsError) as info:
            await kms_client(kms, credentials=StaticCredentials(bad)).call("Decrypt", {})
        assert info.value.code == "InvalidCredentials" and message in info.value.message
        assert not info.value.retryable
        assert value not in str(info.value) or not value
        assert kms.calls == []  # nothing was sent


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=1024)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_response_parser() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert await read_response(_reader(ok)) == (200, b"{}")
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n1;x\r\n \r\n0\r\n\r\n"
    )
    assert await read_response(_reader(chunked)) == (200, b"{} ")
    until_eof = b"HTTP/1.1 400 Bad\r\n\r\nbody"
    assert await read_response(_reader(until_eof)) == (400, b"body")
    for bad in (
        b"SMTP 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz",
        b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 2000 + b"\r\n\r\n",
    ):
        with pytest.raises(KmsError):
            await read_response(_reader(bad))
