"""A local KMS-compatible HTTP server for tests and demos (never for production keys).

It speaks the subset of the KMS JSON protocol sealing uses (``TrentService.GenerateDataKey``,
``TrentService.Decrypt``), plus ``Encrypt`` and the authorisation step of ``ReEncrypt``,
``CreateGrant`` and ``GenerateDataKeyWithoutPlaintext`` (the calls a key policy must deny), and
checks what a real KMS checks on the way:

* HTTP: ``POST /``, ``Content-Type: application/x-amz-json-1.1``, a known ``X-Amz-Target``;
* SigV4: ``Authorization`` format, credential scope (date, region, ``kms``), ``X-Amz-Date``
  within 15 minutes, required signed headers, the session token, and the signature itself,
  recomputed here independently of botocore with the principal's test secret;
* accounts and principals: every access key belongs to one IAM role in one account
  (:meth:`LocalKms.add_principal`); an alias or bare key id resolves in the caller's account, a
  key ARN names a key in any account;
* the key policy (:func:`evaluate_key_policy`): explicit Deny wins, an Allow naming the account
  (``arn:aws:iam::ACCOUNT:root``) delegates to the principal's IAM actions, cross-account access
  needs both; the condition keys ``kms:RecipientAttestation:ImageSha384``/``PCR0..15``,
  ``kms:EncryptionContext:*``, ``kms:CallerAccount`` and ``aws:PrincipalArn`` with the operators
  ``String(Not)Equals(IgnoreCase)`` and ``Null``. A policy using anything else is refused when it
  is set, so a test never silently runs under a policy this server cannot evaluate;
* ``Recipient``: the attestation document is verified by an injected function (normally
  ``vrpc.attestation.Verifier`` under the insecure test root, see :func:`attested_public_key`),
  its PCRs feed the condition keys, and the answer is a real CMS envelope
  (``services.keyvault.cms.build_envelope``) to the RSA key inside the document. Without a
  Recipient the plaintext data key is returned, as real KMS does when the policy allows it.

Not modelled (tests must not rely on them): IAM policy conditions, SCPs, grants, key state,
``kms:ViaService``, multi-Region replicas, rate limits.

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
import fnmatch
import hashlib
import hmac
import json
import os
import re
import ssl
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

__all__ = [
    "AttestedRecipient",
    "KmsRequestError",
    "LocalKms",
    "Principal",
    "RecordedCall",
    "attested_public_key",
    "check_key_policy",
    "evaluate_key_policy",
    "sigv4_signature",
]

log = structlog.get_logger("vrpc.keyvault.testing")

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<sig>[0-9a-f]{64})"
)
_REQUIRED_SIGNED = {"host", "x-amz-date", "x-amz-target", "content-type"}
_ACTIONS = {
    "TrentService.GenerateDataKey",
    "TrentService.Decrypt",
    "TrentService.Encrypt",
    "TrentService.ReEncrypt",
    "TrentService.CreateGrant",
    "TrentService.GenerateDataKeyWithoutPlaintext",
}
# Authorised by the key policy, then refused as not modelled here.
_POLICY_ONLY = {"ReEncrypt", "CreateGrant", "GenerateDataKeyWithoutPlaintext"}
_MAX_BODY = 64 * 1024
_SKEW = dt.timedelta(minutes=15)
_BLOB_MAGIC = b"TKMS"


@dataclasses.dataclass(frozen=True, slots=True)
class AttestedRecipient:
    """What a verified attestation document tells KMS: the recipient key and the PCRs."""

    public_key: bytes
    pcrs: Mapping[int, bytes]


# A recipient check returns the SPKI alone (no attestation: no RecipientAttestation keys) or an
# AttestedRecipient.
RecipientCheck = Callable[[bytes], "bytes | AttestedRecipient"]


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """An IAM role session: its access key, account, role ARN and the KMS actions its IAM
    policies allow (patterns such as ``kms:*``; conditions in IAM policies are not modelled)."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None
    account: str
    arn: str
    iam_actions: tuple[str, ...] = ("kms:*",)


@dataclasses.dataclass(slots=True)
class _Key:
    arn: str
    account: str
    master: bytes
    policy: dict[str, Any]


_OPERATORS = {
    "StringEquals",
    "StringEqualsIgnoreCase",
    "StringNotEquals",
    "StringNotEqualsIgnoreCase",
    "Null",
}
_CONDITION_KEY = re.compile(
    r"kms:recipientattestation:(imagesha384|pcr([0-9]|1[0-5]))|kms:encryptioncontext:.+"
    r"|kms:calleraccount|aws:principalarn"
)
_STATEMENT_FIELDS = {"Sid", "Effect", "Principal", "Action", "Resource", "Condition"}


def _policy_error(message: str) -> KmsRequestError:
    return KmsRequestError("MalformedPolicyDocumentException", message)


def _as_list(value: object, what: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise _policy_error(f"{what} must be a string or a non-empty list of strings")
    return values


def check_key_policy(policy: object) -> dict[str, Any]:
    """Validate ``policy`` as a document this server evaluates exactly; raise otherwise."""
    if not isinstance(policy, dict) or policy.get("Version") != "2012-10-17":
        raise _policy_error("policy must be an object with Version 2012-10-17")
    statements = policy.get("Statement")
    if not isinstance(statements, list) or not statements:
        raise _policy_error("Statement must be a non-empty list")
    for st in statements:
        if not isinstance(st, dict) or set(st) - _STATEMENT_FIELDS:
            extra = set(st) - _STATEMENT_FIELDS if isinstance(st, dict) else st
            raise _policy_error(f"statement element(s) not modelled by LocalKms: {extra}")
        if st.get("Effect") not in ("Allow", "Deny"):
            raise _policy_error("Effect must be Allow or Deny")
        principal = st.get("Principal")
        if principal != "*":
            if not isinstance(principal, dict) or set(principal) != {"AWS"}:
                raise _policy_error("Principal must be '*' or {'AWS': ...}")
            _as_list(principal["AWS"], "Principal.AWS")
        _as_list(st.get("Action"), "Action")
        if st.get("Resource") != "*":
            raise _policy_error("Resource in a key policy must be '*'")
        condition = st.get("Condition", {})
        if not isinstance(condition, dict):
            raise _policy_error("Condition must be an object")
        for operator, block in condition.items():
            if operator not in _OPERATORS:
                raise _policy_error(f"condition operator {operator} is not modelled by LocalKms")
            if not isinstance(block, dict) or not block:
                raise _policy_error(f"{operator} must map condition keys to values")
            for key, values in block.items():
                if not _CONDITION_KEY.fullmatch(key.lower()):
                    raise _policy_error(f"condition key {key} is not modelled by LocalKms")
                _as_list(values, f"{operator} {key}")
    return policy


def _principal_matches(spec: object, who: Principal) -> tuple[bool, bool]:
    """(matches directly, matches as the caller's account) for a statement's Principal."""
    if spec == "*":
        return True, False
    assert isinstance(spec, dict)
    direct = account = False
    for value in _as_list(spec["AWS"], "Principal.AWS"):
        if value == "*" or value == who.arn:
            direct = True
        elif value in (who.account, f"arn:aws:iam::{who.account}:root"):
            account = True
    return direct, account


def _condition_holds(condition: Mapping[str, Any], context: Mapping[str, str]) -> bool:
    # Condition keys are case-insensitive; values compare as the operator says. A key absent
    # from the request fails a positive operator and satisfies a negated one (IAM semantics).
    lowered = {k.lower(): v for k, v in context.items()}
    for operator, block in condition.items():
        for key, raw in block.items():
            values = _as_list(raw, key)
            present = lowered.get(key.lower())
            if operator == "Null":
                if any((present is None) != (v.lower() == "true") for v in values):
                    return False
                continue
            fold = operator.endswith("IgnoreCase")
            equal = present is not None and any(
                present.lower() == v.lower() if fold else present == v for v in values
            )
            if operator.startswith("StringNot") == equal:
                return False
    return True


def evaluate_key_policy(
    policy: Mapping[str, Any],
    *,
    who: Principal,
    action: str,
    key_account: str,
    context: Mapping[str, str],
) -> str | None:
    """None when ``who`` may perform ``kms:action`` on the key; otherwise why not."""
    allowed_direct = allowed_account = False
    for st in policy["Statement"]:
        actions = _as_list(st["Action"], "Action")
        if not any(fnmatch.fnmatchcase(f"kms:{action}".lower(), a.lower()) for a in actions):
            continue
        direct, account = _principal_matches(st["Principal"], who)
        if not (direct or account) or not _condition_holds(st.get("Condition", {}), context):
            continue
        if st["Effect"] == "Deny":
            return f"explicit deny in the key policy (statement {st.get('Sid', '?')})"
        allowed_direct |= direct
        allowed_account |= account
    iam = any(fnmatch.fnmatchcase(f"kms:{action}".lower(), a.lower()) for a in who.iam_actions)
    if who.account == key_account:
        # The account principal delegates to IAM; naming the role itself needs nothing more.
        if allowed_direct or (allowed_account and iam):
            return None
    elif (allowed_direct or allowed_account) and iam:
        return None  # cross-account: the key policy and the caller's IAM policy both allow
    return "no statement of the key policy allows it"


def default_key_policy(account: str) -> dict[str, Any]:
    """The policy KMS gives a key created without one: the account delegates to IAM."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }


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
    """A recipient check from a ``vrpc.attestation.Verifier``: verify, return the public key
    and PCRs. (Real KMS checks the document against the AWS root only; a policy pinning PCRs is
    the key policy's job, so pass a Verifier whose policy pins nothing to model KMS exactly.)"""

    def check(document: bytes) -> AttestedRecipient:
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
        return AttestedRecipient(bytes(claims.public_key), dict(claims.pcrs))

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
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._ssl = ssl_context
        self.recipient_check = recipient_check
        self.region = region
        self.account = account
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._keys: dict[str, _Key] = {}
        self._aliases: dict[tuple[str, str], str] = {}  # (account, alias or key id) -> ARN
        self._principals: dict[str, Principal] = {}
        self.principal = self.add_principal(
            account,
            "vrpc-parent",
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
        )
        self.calls: list[RecordedCall] = []
        self.refuse_next: KmsRequestError | None = None
        # Test hook: answer with this KeyId instead of the key used (what a party in the middle
        # would do); None: the truth.
        self.answer_key_id: str | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The URL on loopback (https when given a TLS context; the certificate decides which
        host name a client must expect, so TLS clients usually name that host and route here)."""
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def access_key_id(self) -> str:
        return self.principal.access_key_id

    @property
    def secret_access_key(self) -> str:
        return self.principal.secret_access_key

    @property
    def session_token(self) -> str | None:
        return self.principal.session_token

    def add_principal(
        self,
        account: str,
        role: str,
        *,
        iam_actions: tuple[str, ...] = ("kms:*",),
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
    ) -> Principal:
        """A role ``role`` in ``account`` with fresh (or given) credentials."""
        principal = Principal(
            access_key_id or "AKIA" + os.urandom(8).hex().upper(),
            secret_access_key or os.urandom(20).hex(),
            session_token,
            account,
            f"arn:aws:iam::{account}:role/{role}",
            iam_actions,
        )
        self._principals[principal.access_key_id] = principal
        return principal

    def create_key(
        self,
        alias: str | None = None,
        *,
        account: str | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> str:
        """A new key in ``account`` (default: this server's); returns its ARN. ``alias/NAME``
        resolves in that account when given; without ``policy`` the key gets KMS's default."""
        owner = account or self.account
        arn = f"arn:aws:kms:{self.region}:{owner}:key/{uuid.uuid4()}"
        chosen = check_key_policy(dict(policy)) if policy is not None else None
        self._keys[arn] = _Key(arn, owner, os.urandom(32), chosen or default_key_policy(owner))
        self._aliases[owner, arn.rsplit("/", 1)[1]] = arn
        if alias is not None:
            self._aliases[owner, f"alias/{alias}"] = arn
        return arn

    def set_key_policy(self, arn: str, policy: Mapping[str, Any]) -> None:
        self._keys[arn].policy = check_key_policy(dict(policy))

    async def __aenter__(self) -> LocalKms:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._ssl)
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
        except (OSError, TimeoutError, asyncio.IncompleteReadError, KmsError, ssl.SSLError):
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
        who = self._check_signature(headers, body)
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
        action = target.split(".", 1)[1]
        recipient = self._recipient(request)
        if action == "Decrypt":
            reply = self._decrypt(request, recipient, who)
        elif action == "Encrypt":
            reply = self._encrypt(request, who)
        elif action == "GenerateDataKey":
            reply = self._generate_data_key(request, recipient, who)
        else:
            key = self._resolve(request.get("KeyId"), who)
            self._authorize(who, action, key, request, None)
            raise KmsRequestError(
                "UnsupportedOperationException",
                f"{action} is allowed by the key policy but not modelled by LocalKms",
            )
        if self.answer_key_id is not None:
            reply["KeyId"] = self.answer_key_id
        return reply

    def _check_signature(self, headers: Mapping[str, str], body: bytes) -> Principal:
        match = _AUTH.fullmatch(headers.get("authorization", ""))
        if match is None:
            raise KmsRequestError("IncompleteSignatureException", "Authorization is not SigV4")
        who = self._principals.get(match["key"])
        if who is None:
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
        if who.session_token is not None and (
            "x-amz-security-token" not in signed
            or not hmac.compare_digest(
                headers.get("x-amz-security-token", "").encode(), who.session_token.encode()
            )
        ):
            raise KmsRequestError("UnrecognizedClientException", "security token invalid")
        expected = sigv4_signature(
            secret=who.secret_access_key,
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
        return who

    # -- KMS operations --------------------------------------------------------------------

    def _recipient(
        self, request: Mapping[str, Any]
    ) -> tuple[rsa.RSAPublicKey | None, dict[str, str]]:
        """The recipient key and the condition keys its attestation document sets; a request
        without Recipient gets (None, {})."""
        recipient = request.get("Recipient")
        if recipient is None:
            return None, {}
        if not isinstance(recipient, dict):
            raise KmsRequestError("ValidationException", "Recipient must be an object")
        if recipient.get("KeyEncryptionAlgorithm") != KEY_ENCRYPTION_ALGORITHM:
            raise KmsRequestError("ValidationException", "KeyEncryptionAlgorithm")
        document = _unb64(recipient.get("AttestationDocument"), "AttestationDocument")
        checked = self.recipient_check(document)
        context: dict[str, str] = {}
        if isinstance(checked, AttestedRecipient):
            spki = checked.public_key
            for index, value in checked.pcrs.items():
                context[f"kms:RecipientAttestation:PCR{index}"] = value.hex()
            if 0 in checked.pcrs:
                # For a Nitro enclave the image digest is PCR0.
                context["kms:RecipientAttestation:ImageSha384"] = checked.pcrs[0].hex()
        else:
            spki = checked
        try:
            key = serialization.load_der_public_key(spki)
        except ValueError:
            raise KmsRequestError("ValidationException", "public_key is not SPKI DER") from None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            raise KmsRequestError("ValidationException", "public_key is not RSA >= 2048")
        return key, context

    def _resolve(self, key_id: object, who: Principal) -> _Key:
        if not isinstance(key_id, str):
            raise KmsRequestError("ValidationException", "KeyId is required")
        # A key ARN names one key in any account; an alias or a bare key id is looked up in
        # the caller's account (which is why the enclave pins the ARN).
        arn = key_id if key_id in self._keys else self._aliases.get((who.account, key_id))
        if arn is None:
            raise KmsRequestError("NotFoundException", f"key {key_id!r} does not exist")
        return self._keys[arn]

    def _authorize(
        self,
        who: Principal,
        action: str,
        key: _Key,
        request: Mapping[str, Any],
        attestation: Mapping[str, str] | None,
    ) -> None:
        context = {"kms:CallerAccount": who.account, "aws:PrincipalArn": who.arn}
        context.update(attestation or {})
        encryption_context = request.get("EncryptionContext", {})
        if isinstance(encryption_context, dict):
            for name, value in encryption_context.items():
                context[f"kms:EncryptionContext:{name}"] = str(value)
        why = evaluate_key_policy(
            key.policy, who=who, action=action, key_account=key.account, context=context
        )
        if why is not None:
            raise KmsRequestError(
                "AccessDeniedException",
                f"User: {who.arn} is not authorized to perform: kms:{action} on resource: "
                f"{key.arn} because of {why}",
            )

    def _wrap(self, key: _Key, data_key: bytes, context: Mapping[str, str]) -> bytes:
        arn_bytes = key.arn.encode()
        nonce = os.urandom(12)
        wrapped = AESGCM(key.master).encrypt(nonce, data_key, arn_bytes + _canonical(context))
        return _BLOB_MAGIC + struct.pack(">H", len(arn_bytes)) + arn_bytes + nonce + wrapped

    def _generate_data_key(
        self,
        request: Mapping[str, Any],
        recipient: tuple[rsa.RSAPublicKey | None, dict[str, str]],
        who: Principal,
    ) -> dict[str, Any]:
        key = self._resolve(request.get("KeyId"), who)
        if request.get("KeySpec") != "AES_256":
            raise KmsRequestError("ValidationException", "KeySpec must be AES_256 here")
        context = _context(request)
        public_key, attestation = recipient
        self._authorize(who, "GenerateDataKey", key, request, attestation)
        data_key = os.urandom(32)
        blob = self._wrap(key, data_key, context)
        return {"KeyId": key.arn, "CiphertextBlob": _b64(blob), **_deliver(data_key, public_key)}

    def _encrypt(self, request: Mapping[str, Any], who: Principal) -> dict[str, Any]:
        key = self._resolve(request.get("KeyId"), who)
        plaintext = _unb64(request.get("Plaintext"), "Plaintext")
        context = _context(request)
        self._authorize(who, "Encrypt", key, request, None)
        return {"KeyId": key.arn, "CiphertextBlob": _b64(self._wrap(key, plaintext, context))}

    def _decrypt(
        self,
        request: Mapping[str, Any],
        recipient: tuple[rsa.RSAPublicKey | None, dict[str, str]],
        who: Principal,
    ) -> dict[str, Any]:
        blob = _unb64(request.get("CiphertextBlob"), "CiphertextBlob")
        context = _context(request)
        if len(blob) < 6 or blob[:4] != _BLOB_MAGIC:
            raise KmsRequestError("InvalidCiphertextException", "ciphertext blob not recognised")
        (n,) = struct.unpack_from(">H", blob, 4)
        key = self._keys.get(blob[6 : 6 + n].decode(errors="replace"))
        if key is None:
            raise KmsRequestError("InvalidCiphertextException", "ciphertext blob not recognised")
        if "KeyId" in request and self._resolve(request["KeyId"], who) is not key:
            raise KmsRequestError("IncorrectKeyException", "KeyId does not match the blob")
        public_key, attestation = recipient
        self._authorize(who, "Decrypt", key, request, attestation)
        nonce, wrapped = blob[6 + n : 18 + n], blob[18 + n :]
        try:
            data_key = AESGCM(key.master).decrypt(
                nonce, wrapped, key.arn.encode() + _canonical(context)
            )
        except InvalidTag:
            raise KmsRequestError("InvalidCiphertextException", "blob or context invalid") from None
        algorithm = {"EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        return {"KeyId": key.arn, **algorithm, **_deliver(data_key, public_key)}


def _deliver(plaintext: bytes, recipient: rsa.RSAPublicKey | None) -> dict[str, Any]:
    # With a Recipient only the CMS envelope; without one the plaintext itself (real KMS does
    # this whenever the key policy allows the call).
    if recipient is None:
        return {"Plaintext": _b64(plaintext)}
    return {"CiphertextForRecipient": _b64(build_envelope(plaintext, recipient)), "Plaintext": None}


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
