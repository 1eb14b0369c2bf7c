"""A minimal AWS KMS client for the enclave: SigV4-signed JSON over a small HTTP/1.1 client.

Only the two calls sealing needs are implemented, ``GenerateDataKey`` and ``Decrypt``, always
with a ``Recipient`` (the enclave's attestation document carrying an ephemeral RSA-2048 public
key), so KMS never returns a plaintext data key: it returns ``CiphertextForRecipient``, a CMS
envelope only this enclave can open (``services.keyvault.cms``).

The enclave has no network interface. In production the TCP connection goes to a local
forward (``services.keyvault.forward``) that relays it over vsock to ``vsock-proxy`` on the
parent, which relays it to ``kms.REGION.amazonaws.com:443``. TLS runs end to end between the
enclave and KMS, so the parent sees ciphertext only; the request is signed with credentials the
parent supplies (``services.keyvault.credentials``) — harmless under the key policy of
``deploy/kms-key-policy.json``, which denies plaintext to any request without this build's
``kms:RecipientAttestation:ImageSha384``. Those credentials are checked before they reach a
header, and the endpoint must be https.

Signing uses botocore's SigV4 implementation; the transport is written here because botocore's
HTTP stack is blocking and far larger than two POST requests need.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any, Protocol

import structlog
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from vrpc.exceptions import VrpcError

__all__ = [
    "AwsCredentials",
    "CredentialsProvider",
    "DataKey",
    "Decrypted",
    "KmsClient",
    "KmsError",
    "Route",
    "StaticCredentials",
    "TcpRoute",
]

log = structlog.get_logger("vrpc.keyvault.kms")

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
CONTENT_TYPE = "application/x-amz-json-1.1"
_MAX_HEADER_BYTES = 32 * 1024
_MAX_BODY_BYTES = 1 << 20  # KMS answers are a few KiB
_DEFAULT_TIMEOUT = 10.0
# What reaches the request headers from the parent's credentials: an access key id (in the
# Authorization header) and a session token (X-Amz-Security-Token). AWS issues both in these
# alphabets; anything else (CR, LF, non-ASCII) would split or break the request.
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9]{1,128}")
_SESSION_TOKEN = re.compile(r"[A-Za-z0-9/+=_-]{1,16384}")


class KmsError(VrpcError):
    """A KMS call failed. ``code`` is KMS's ``__type`` (e.g. ``AccessDeniedException``),
    or ``"TransportError"`` / ``"MalformedResponse"`` for failures on the way."""

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        suffix = f" (HTTP {http_status})" if http_status else ""
        super().__init__(f"KMS {code}: {message}{suffix}")

    @property
    def retryable(self) -> bool:
        if self.code == "InvalidCredentials":
            return False
        return (
            self.http_status is None
            or self.http_status >= 500
            or self.code
            in {
                "ThrottlingException",
                "KMSInternalException",
            }
        )


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    expiration_epoch: float | None = None  # Unix seconds; None: does not expire

    def __repr__(self) -> str:  # never print the secret
        return f"AwsCredentials({self.access_key_id[:4]}…, expires={self.expiration_epoch})"


class CredentialsProvider(Protocol):
    async def credentials(self) -> AwsCredentials: ...


@dataclasses.dataclass(frozen=True, slots=True)
class StaticCredentials:
    """Fixed credentials (tests, or keys injected by other means)."""

    value: AwsCredentials

    async def credentials(self) -> AwsCredentials:
        return self.value


class Route(Protocol):
    """Where the TCP connection for the endpoint actually goes."""

    async def address(self) -> tuple[str, int]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class TcpRoute:
    host: str
    port: int

    async def address(self) -> tuple[str, int]:
        return self.host, self.port


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class DataKey:
    ciphertext_blob: bytes  # opaque KMS blob: store it, hand it back to Decrypt
    ciphertext_for_recipient: bytes  # CMS envelope to the recipient RSA key
    key_id: str


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Decrypted:
    ciphertext_for_recipient: bytes  # CMS envelope of the plaintext to the recipient RSA key
    key_id: str  # the ARN of the key KMS used (the reply's KeyId)


class KmsClient:
    """``GenerateDataKey`` / ``Decrypt`` with a Recipient.

    ``endpoint`` is the KMS URL used for the Host header, SigV4 and TLS server name (e.g.
    ``https://kms.eu-west-1.amazonaws.com``); ``route`` is where the TCP connection goes
    (default: the endpoint's own host and port). The endpoint must be https: the TCP path runs
    through the parent, and only TLS to KMS keeps it out. ``allow_insecure_http`` admits an
    ``http://`` endpoint for local test servers only.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        region: str,
        credentials: CredentialsProvider,
        route: Route | None = None,
        timeout: float = _DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"KMS endpoint must be an https URL, got {endpoint!r}")
        if url.scheme == "http" and not allow_insecure_http:
            raise ValueError(
                f"KMS endpoint must be https (TLS from inside the enclave), got {endpoint!r}"
            )
        self._tls = url.scheme == "https"
        self._hostname = url.hostname
        port = url.port or (443 if self._tls else 80)
        self._netloc = url.netloc
        self._url = f"{url.scheme}://{url.netloc}/"
        self._region = region
        self._credentials = credentials
        self._route: Route = route or TcpRoute(url.hostname, port)
        self._timeout = timeout
        self._ssl = (
            ssl_context
            if ssl_context is not None
            else (ssl.create_default_context() if self._tls else None)
        )

    async def generate_data_key(
        self,
        key_id: str,
        *,
        attestation_document: bytes,
        encryption_context: Mapping[str, str] | None = None,
    ) -> DataKey:
        body: dict[str, Any] = {
            "KeyId": key_id,
            "KeySpec": "AES_256",
            "Recipient": _recipient(attestation_document),
        }
        if encryption_context:
            body["EncryptionContext"] = dict(encryption_context)
        reply = await self.call("GenerateDataKey", body)
        if reply.get("Plaintext") is not None:
            # With a Recipient KMS must not return the plaintext; if it does, something between
            # here and KMS is not KMS. Refuse rather than use a key the parent may have seen.
            raise KmsError("MalformedResponse", "GenerateDataKey returned a plaintext key")
        return DataKey(
            ciphertext_blob=_b64(reply, "CiphertextBlob"),
            ciphertext_for_recipient=_b64(reply, "CiphertextForRecipient"),
            key_id=_str(reply, "KeyId"),
        )

    async def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        attestation_document: bytes,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Decrypted:
        """The ``CiphertextForRecipient`` envelope of the plaintext, and the key KMS used."""
        body: dict[str, Any] = {
            "CiphertextBlob": base64.b64encode(ciphertext_blob).decode(),
            "Recipient": _recipient(attestation_document),
        }
        if key_id is not None:
            body["KeyId"] = key_id
        if encryption_context:
            body["EncryptionContext"] = dict(encryption_context)
        reply = await self.call("Decrypt", body)
        if reply.get("Plaintext") is not None:
            raise KmsError("MalformedResponse", "Decrypt returned a plaintext despite Recipient")
        return Decrypted(_b64(reply, "CiphertextForRecipient"), _str(reply, "KeyId"))

    async def call(self, action: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST one signed ``TrentService.<action>`` request and return the JSON reply."""
        creds = await self._credentials.credentials()
        _check_credentials(creds)
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = self._sign(action, payload, creds)
        try:
            async with asyncio.timeout(self._timeout):
                status, reply = await self._post(headers, payload)
        except TimeoutError:
            raise KmsError("TransportError", f"{action} timed out after {self._timeout}s") from None
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            raise KmsError("TransportError", f"{action}: {type(exc).__name__}: {exc}") from exc
        try:
            obj = json.loads(reply) if reply else {}
        except ValueError:
            raise KmsError("MalformedResponse", f"{action} reply is not JSON", status) from None
        if not isinstance(obj, dict):
            raise KmsError("MalformedResponse", f"{action} reply is not a JSON object", status)
        if status != 200:
            code = str(obj.get("__type", "UnknownError")).rsplit("#", 1)[-1]
            message = str(obj.get("message", obj.get("Message", "")))[:300]
            log.warning("kms call failed", action=action, code=code, http_status=status)
            raise KmsError(code, message, status)
        log.info("kms call", action=action, http_status=status)
        return obj

    def _sign(self, action: str, payload: bytes, creds: AwsCredentials) -> dict[str, str]:
        request = AWSRequest(
            method="POST",
            url=self._url,
            data=payload,
            headers={
                "Host": self._netloc,
                "Content-Type": CONTENT_TYPE,
                "X-Amz-Target": f"TrentService.{action}",
            },
        )
        botocreds = Credentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
        SigV4Auth(botocreds, "kms", self._region).add_auth(request)
        return {str(k): str(v) for k, v in request.headers.items()}

    async def _post(self, headers: Mapping[str, str], payload: bytes) -> tuple[int, bytes]:
        host, port = await self._route.address()
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=self._ssl,
            server_hostname=self._hostname if self._tls else None,
            limit=_MAX_HEADER_BYTES,
        )
        try:
            head = ["POST / HTTP/1.1\r\n"]
            head += [f"{k}: {v}\r\n" for k, v in headers.items()]
            head.append(f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
            writer.write("".join(head).encode("latin-1") + payload)
            await writer.drain()
            return await read_response(reader)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response: (status, body). Bounded; Content-Length or chunked."""
    status_line = await _read_line(reader)
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise KmsError("MalformedResponse", "bad HTTP status line")
    headers = await read_headers(reader)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return int(parts[1]), await _read_chunked(reader)
    if "content-length" in headers:
        length = _content_length(headers["content-length"])
        return int(parts[1]), await reader.readexactly(length)
    body = await reader.read(_MAX_BODY_BYTES + 1)
    if len(body) > _MAX_BODY_BYTES:
        raise KmsError("MalformedResponse", "response body too large")
    return int(parts[1]), body


async def read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    """Header lines up to the blank line, lower-cased names; bounded in count and size."""
    headers: dict[str, str] = {}
    for _ in range(100):
        line = await _read_line(reader)
        if not line:
            return headers
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise KmsError("MalformedResponse", "bad HTTP header line")
        headers[name.lower()] = value.strip()
    raise KmsError("MalformedResponse", "too many HTTP header lines")


def _content_length(value: str) -> int:
    if not value.isdigit() or int(value) > _MAX_BODY_BYTES:
        raise KmsError("MalformedResponse", "bad or too large Content-Length")
    return int(value)


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise KmsError("MalformedResponse", "HTTP line too long") from None
    return line[:-2].decode("latin-1")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_text = (await _read_line(reader)).split(";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise KmsError("MalformedResponse", "bad chunk size") from None
        if size < 0 or len(body) + size > _MAX_BODY_BYTES:
            raise KmsError("MalformedResponse", "chunked body too large")
        if size == 0:
            await read_headers(reader)  # trailers
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise KmsError("MalformedResponse", "chunk not followed by CRLF")


def _check_credentials(creds: AwsCredentials) -> None:
    # The parent supplies these; refuse before they reach a header. The values are secrets (or
    # close to it): the error names the field, never the value.
    if not _ACCESS_KEY_ID.fullmatch(creds.access_key_id):
        raise KmsError("InvalidCredentials", "the access key id has characters AWS never issues")
    if not creds.secret_access_key:
        raise KmsError("InvalidCredentials", "the secret access key is empty")
    token = creds.session_token
    if token is not None and not _SESSION_TOKEN.fullmatch(token):
        raise KmsError(
            "InvalidCredentials", "the session token has characters AWS never issues (or is empty)"
        )


def _recipient(attestation_document: bytes) -> dict[str, str]:
    return {
        "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
        "AttestationDocument": base64.b64encode(attestation_document).decode(),
    }


def _b64(reply: Mapping[str, Any], field: str) -> bytes:
    value = reply.get(field)
    if not isinstance(value, str):
        raise KmsError("MalformedResponse", f"reply lacks {field}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsError("MalformedResponse", f"{field} is not base64") from None


def _str(reply: Mapping[str, Any], field: str) -> str:
    value = reply.get(field)
    if not isinstance(value, str):
        raise KmsError("MalformedResponse", f"reply lacks {field}")
    return value
