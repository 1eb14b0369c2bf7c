"""A local KMS-compatible HTTP server for tests and demos (never for production keys).

It speaks the subset of the KMS JSON protocol sealing uses (``TrentService.GenerateDataKey`` and
``TrentService.Decrypt``), and checks what a real KMS checks on the way:

* HTTP: ``POST /``, ``Content-Type: application/x-amz-json-1.1``, a known ``X-Amz-Target``;
* SigV4: ``Authorization`` format, credential scope (date, region, ``kms``), ``X-Amz-Date``
  within 15 minutes, required signed headers, the session token, and the signature itself,
  recomputed here independently of botocore with the known test secret;
* ``Recipient`` is required: the attestation document is verified by an injected function
  (normally ``vrpc.attestation.Verifier`` under the insecure test root, see
  :func:`attested_public_key`), and the answer is a real CMS envelope
  (``services.keyvault.cms.build_envelope``) to the RSA key inside the document.

Data keys are wrapped under per-key master keys held in memory; ``CiphertextBlob`` is
``b"TKMS" || len(key arn) || key arn || nonce || AES-256-GCM(master, data key, aad=arn||context)``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.keyvault.cms import build_envelope
from services.keyvault.kms import CONTENT_TYPE, KEY_ENCRYPTION_ALGORITHM, KmsError, read_headers

__all__ = ["KmsRequestError", "LocalKms", "RecordedCall", "attested_public_key", "sigv4_signature"]

log = structlog.get_logger("vrpc.keyvault.testing")

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<sig>[0-9a-f]{64})"
)
_REQUIRED_SIGNED = {"host", "x-amz-date", "x-amz-target", "content-type"}
_ACTIONS = {"TrentService.GenerateDataKey", "TrentService.Decrypt"}
_MAX_BODY = 64 * 1024
_SKEW = dt.timedelta(minutes=15)
_BLOB_MAGIC = b"TKMS"

RecipientCheck = Callable[[bytes], bytes]


class KmsRequestError(Exception):
    """A request KMS would refuse: ``code`` is the ``__type`` KMS would send."""

    def __init__(self, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedCall:
    action: str
    headers: Mapping[str, str]
    body: Mapping[str, Any]


def attested_public_key(
    verifier: Any, *, now: Callable[[], dt.datetime] | None = None
) -> RecipientCheck:
    """A recipient check from a ``vrpc.attestation.Verifier``: verify, return ``public_key``."""

    def check(document: bytes) -> bytes:
        when = now() if now is not None else dt.datetime.now(dt.UTC)
        try:
            claims = verifier.verify(document, now=when)
        except Exception as exc:  # every AttestationError: KMS just says the document is bad
            raise KmsRequestError(
                "ValidationException",
                f"attestation document rejected: {type(exc).__name__}: {exc}",
            ) from exc
        if claims.public_key is None:
            raise KmsRequestError("ValidationException", "attestation document has no public_key")
        return bytes(claims.public_key)

    return check


def sigv4_signature(
    *,
    secret: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    signed_headers: list[str],
    body: bytes,
    amz_date: str,
    scope: str,
) -> str:
    """SigV4 (AWS General Reference, "Create a signed AWS API request"), query string empty."""
    canonical_headers = "".join(
        f"{name}:{' '.join(headers[name].split())}\n" for name in signed_headers
    )
    canonical_request = "\n".join(
        [
            method,
            path,
            "",
            canonical_headers,
            ";".join(signed_headers),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


class LocalKms:
    """``async with LocalKms(...) as kms:`` then point a ``KmsClient`` at ``kms.endpoint``."""

    def __init__(
        self,
        *,
        recipient_check: RecipientCheck,
        access_key_id: str = "AKIATESTKEYVAULT0001",
        secret_access_key: str = "test-secret-key-not-a-real-one",
        session_token: str | None = None,
        region: str = "eu-west-1",
        account: str = "111122223333",
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.recipient_check = recipient_check
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.session_token = session_token
        self.region = region
        self.account = account
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._masters: dict[str, bytes] = {}
        self._aliases: dict[str, str] = {}
        self.calls: list[RecordedCall] = []
        self.refuse_next: KmsRequestError | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_key(self, alias: str | None = None) -> str:
        """A new master key; returns its ARN (``alias/NAME`` also resolves when given)."""
        arn = f"arn:aws:kms:{self.region}:{self.account}:key/{uuid.uuid4()}"
        self._masters[arn] = os.urandom(32)
        self._aliases[arn.rsplit("/", 1)[1]] = arn
        if alias is not None:
            self._aliases[f"alias/{alias}"] = arn
        return arn

    async def __aenter__(self) -> LocalKms:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                status, reply = await self._one_request(reader)
            body = json.dumps(reply).encode()
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Bad Request'}\r\n"
                f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, KmsError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _one_request(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        request_line = (await reader.readuntil(b"\r\n"))[:-2].decode("latin-1")
        headers = await read_headers(reader)
        length = headers.get("content-length", "")
        if not length.isdigit() or int(length) > _MAX_BODY:
            return 400, _error("SerializationException", "Content-Length missing or too large")
        body = await reader.readexactly(int(length))
        try:
            return 200, self._dispatch(request_line, headers, body)
        except KmsRequestError as exc:
            log.info("local kms refused", code=exc.code)
            return exc.http_status, _error(exc.code, exc.message)

    def _dispatch(self, request_line: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0]
        if method != "POST" or path != "/":
            raise KmsRequestError("UnknownOperationException", f"{method} {path} not supported")
        if headers.get("content-type") != CONTENT_TYPE:
            raise KmsRequestError("SerializationException", f"Content-Type must be {CONTENT_TYPE}")
        target = headers.get("x-amz-target", "")
        if target not in _ACTIONS:
            raise KmsRequestError("UnknownOperationException", f"X-Amz-Target {target!r}")
        self._check_signature(headers, body)
        try:
            request = json.loads(body)
        except ValueError:
            raise KmsRequestError("SerializationException", "body is not JSON") from None
        if not isinstance(request, dict):
            raise KmsRequestError("SerializationException", "body is not a JSON object")
        self.calls.append(RecordedCall(target.split(".", 1)[1], dict(headers), request))
        if self.refuse_next is not None:
            refusal, self.refuse_next = self.refuse_next, None
            raise refusal
        recipient = self._recipient(request)
        if target == "TrentService.GenerateDataKey":
            return self._generate_data_key(request, recipient)
        return self._decrypt(request, recipient)

    def _check_signature(self, headers: Mapping[str, str], body: bytes) -> None:
        match = _AUTH.fullmatch(headers.get("authorization", ""))
        if match is None:
            raise KmsRequestError("IncompleteSignatureException", "Authorization is not SigV4")
        if match["key"] != self.access_key_id:
            raise KmsRequestError("UnrecognizedClientException", "unknown access key id")
        if match["region"] != self.region or match["service"] != "kms":
            raise KmsRequestError("InvalidSignatureException", "credential scope region/service")
        amz_date = headers.get("x-amz-date", "")
        try:
            when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            raise KmsRequestError("IncompleteSignatureException", "X-Amz-Date missing") from None
        if amz_date[:8] != match["date"]:
            raise KmsRequestError("InvalidSignatureException", "scope date is not X-Amz-Date")
        if abs(self._clock() - when) > _SKEW:
            raise KmsRequestError("InvalidSignatureException", "Signature expired (clock skew)")
        signed = match["signed"].split(";")
        if signed != sorted(signed) or not set(signed) >= _REQUIRED_SIGNED:
            raise KmsRequestError("InvalidSignatureException", f"SignedHeaders {signed}")
        if any(name not in headers for name in signed):
            raise KmsRequestError("InvalidSignatureException", "a signed header is absent")
        if self.session_token is not None and (
            "x-amz-security-token" not in signed
            or not hmac.compare_digest(
                headers.get("x-amz-security-token", "").encode(), self.session_token.encode()
            )
        ):
            raise KmsRequestError("UnrecognizedClientException", "security token invalid")
        expected = sigv4_signature(
            secret=self.secret_access_key,
            method="POST",
            path="/",
            headers=headers,
            signed_headers=signed,
            body=body,
            amz_date=amz_date,
            scope=f"{match['date']}/{self.region}/kms/aws4_request",
        )
        if not hmac.compare_digest(expected, match["sig"]):
            raise KmsRequestError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided",
            )

    # -- KMS operations --------------------------------------------------------------------

    def _recipient(self, request: Mapping[str, Any]) -> rsa.RSAPublicKey:
        recipient = request.get("Recipient")
        if not isinstance(recipient, dict):
            # Real KMS would return the plaintext; sealing must never depend on that.
            raise KmsRequestError("ValidationException", "this test KMS requires a Recipient")
        if recipient.get("KeyEncryptionAlgorithm") != KEY_ENCRYPTION_ALGORITHM:
            raise KmsRequestError("ValidationException", "KeyEncryptionAlgorithm")
        document = _unb64(recipient.get("AttestationDocument"), "AttestationDocument")
        spki = self.recipient_check(document)
        try:
            key = serialization.load_der_public_key(spki)
        except ValueError:
            raise KmsRequestError("ValidationException", "public_key is not SPKI DER") from None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            raise KmsRequestError("ValidationException", "public_key is not RSA >= 2048")
        return key

    def _resolve(self, key_id: object) -> str:
        if not isinstance(key_id, str):
            raise KmsRequestError("ValidationException", "KeyId is required")
        arn = key_id if key_id in self._masters else self._aliases.get(key_id)
        if arn is None:
            raise KmsRequestError("NotFoundException", f"key {key_id!r} does not exist")
        return arn

    def _generate_data_key(
        self, request: Mapping[str, Any], recipient: rsa.RSAPublicKey
    ) -> dict[str, Any]:
        arn = self._resolve(request.get("KeyId"))
        if request.get("KeySpec") != "AES_256":
            raise KmsRequestError("ValidationException", "KeySpec must be AES_256 here")
        context = _context(request)
        data_key = os.urandom(32)
        arn_bytes = arn.encode()
        nonce = os.urandom(12)
        wrapped = AESGCM(self._masters[arn]).encrypt(
            nonce, data_key, arn_bytes + _canonical(context)
        )
        blob = _BLOB_MAGIC + struct.pack(">H", len(arn_bytes)) + arn_bytes + nonce + wrapped
        return {
            "KeyId": arn,
            "CiphertextBlob": _b64(blob),
            "CiphertextForRecipient": _b64(build_envelope(data_key, recipient)),
            "Plaintext": None,
        }

    def _decrypt(self, request: Mapping[str, Any], recipient: rsa.RSAPublicKey) -> dict[str, Any]:
        blob = _unb64(request.get("CiphertextBlob"), "CiphertextBlob")
        context = _context(request)
        if len(blob) < 6 or blob[:4] != _BLOB_MAGIC:
            raise KmsRequestError("InvalidCiphertextException", "ciphertext blob not recognised")
        (n,) = struct.unpack_from(">H", blob, 4)
        arn = blob[6 : 6 + n].decode(errors="replace")
        if arn not in self._masters:
            raise KmsRequestError("InvalidCiphertextException", "ciphertext blob not recognised")
        if "KeyId" in request and self._resolve(request["KeyId"]) != arn:
            raise KmsRequestError("IncorrectKeyException", "KeyId does not match the blob")
        nonce, wrapped = blob[6 + n : 18 + n], blob[18 + n :]
        try:
            data_key = AESGCM(self._masters[arn]).decrypt(
                nonce, wrapped, arn.encode() + _canonical(context)
            )
        except InvalidTag:
            raise KmsRequestError("InvalidCiphertextException", "blob or context invalid") from None
        return {
            "KeyId": arn,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "CiphertextForRecipient": _b64(build_envelope(data_key, recipient)),
        }


def _context(request: Mapping[str, Any]) -> dict[str, str]:
    context = request.get("EncryptionContext", {})
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise KmsRequestError("ValidationException", "EncryptionContext must map str to str")
    return context


def _canonical(context: Mapping[str, str]) -> bytes:
    return json.dumps(sorted(context.items())).encode()


def _unb64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise KmsRequestError("ValidationException", f"{field} is required")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsRequestError("ValidationException", f"{field} is not base64") from None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"__type": code, "message": message}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
