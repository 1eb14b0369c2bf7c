"""Caller authentication bound to the attested session, and per-method authorisation.

The vrpc handshake proves the server (the enclave) to the client. Proving the *caller* to the
server is the application's job; this module is the pattern for every vrpc service
(docs/security.md, "Authenticating callers"):

* Each caller holds an Ed25519 key. The server is built with the callers it trusts
  (:class:`TrustedCaller`: a key id, the public key and the caller's roles). In an enclave that
  list is part of the image, so it is measured (PCR0) and the parent instance cannot change it.
* On every call the caller sends, in call metadata, its key id (``vrpc-caller``) and an Ed25519
  signature (``vrpc-caller-sig``) over ``CONTEXT || channel_binding``. The channel binding is a
  48-byte value unique to the session and equal on both ends, so a signature is worth nothing on
  any other session: whoever relays the bytes (the parent) can neither read it (the session is
  encrypted) nor replay it elsewhere. The signature is computed once per session
  (:class:`SessionSigner` caches it).
* :class:`CallerAuthenticator` (a server interceptor) verifies the signature, then checks the
  method's roles; handlers read the authenticated caller with :func:`current_caller` for finer
  rules (e.g. per key). Missing, unknown or invalid credentials are ``UNAUTHENTICATED``; a known
  caller without a role the method needs is ``PERMISSION_DENIED``. Every refusal happens before
  the handler runs.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import dataclasses
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vrpc.client import Client, ClientInterceptor
from vrpc.context import CallContext
from vrpc.exceptions import RpcError
from vrpc.status import Status

__all__ = [
    "ANY_CALLER",
    "CONTEXT",
    "METADATA_KEY_ID",
    "METADATA_SIGNATURE",
    "Caller",
    "CallerAuthenticator",
    "SessionSigner",
    "TrustedCaller",
    "current_caller",
    "load_callers",
]

#: Domain separation: these signatures can never be mistaken for signatures of anything else.
CONTEXT = b"vrpc caller authentication v1\x00"
METADATA_KEY_ID = "vrpc-caller"
METADATA_SIGNATURE = "vrpc-caller-sig"
#: In ``method_roles``: any authenticated caller may call the method.
ANY_CALLER = "*"

_MAX_KEY_ID_CHARS = 128
_VERIFIED_CACHE = 4096
_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "vrpc_caller", default=None
)


@dataclasses.dataclass(frozen=True, slots=True)
class TrustedCaller:
    """A caller the server trusts: key id, Ed25519 public key, roles."""

    key_id: str
    public_key: Ed25519PublicKey
    roles: frozenset[str]


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of the current call."""

    key_id: str
    roles: frozenset[str]


def current_caller() -> Caller | None:
    """The caller :class:`CallerAuthenticator` authenticated for this call (None outside one)."""
    return _current.get()


def load_callers(data: Any) -> list[TrustedCaller]:
    """Trusted callers from JSON-shaped data::

        {"callers": [{"key_id": "ops", "public_key": "<base64 of the 32-byte Ed25519 key>",
                      "roles": ["admin"]}, ...]}

    Raises ``ValueError`` naming the first problem: duplicate key ids, bad keys or roles.
    """
    if not isinstance(data, dict) or not isinstance(data.get("callers"), list):
        raise ValueError('caller list must be an object {"callers": [...]}')
    callers: list[TrustedCaller] = []
    for index, entry in enumerate(data["callers"]):
        where = f"callers[{index}]"
        if not isinstance(entry, dict) or set(entry) != {"key_id", "public_key", "roles"}:
            raise ValueError(f"{where} must have exactly key_id, public_key and roles")
        key_id, encoded, roles = entry["key_id"], entry["public_key"], entry["roles"]
        if not isinstance(key_id, str) or not 0 < len(key_id) <= _MAX_KEY_ID_CHARS:
            raise ValueError(f"{where}.key_id must be 1..{_MAX_KEY_ID_CHARS} characters")
        try:
            raw = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
            public_key = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}.public_key is not a base64 Ed25519 public key") from None
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            raise ValueError(f"{where}.roles must be a list of non-empty strings")
        if any(c.key_id == key_id for c in callers):
            raise ValueError(f"{where}.key_id {key_id!r} is listed twice")
        callers.append(TrustedCaller(key_id, public_key, frozenset(roles)))
    return callers


def _denied(status: Status, message: str) -> RpcError:
    return RpcError(status, message, {"param": None})


class CallerAuthenticator:
    """Server interceptor: authenticate the caller of every call, then check the method's roles.

    ``method_roles`` maps full method names (``"keyvault.v1.seal"``) to the roles allowed to
    call them (any one suffices; :data:`ANY_CALLER` admits every authenticated caller). A method
    with no entry is refused: adding a method never opens it by accident. ``public_methods`` are
    let through without credentials (by default only the health check).
    """

    def __init__(
        self,
        callers: Iterable[TrustedCaller],
        *,
        method_roles: Mapping[str, Collection[str]],
        public_methods: Collection[str] = ("vrpc.health.check",),
    ) -> None:
        self._callers = {c.key_id: c for c in callers}
        self._method_roles = {m: frozenset(r) for m, r in method_roles.items()}
        self._public = frozenset(public_methods)
        # (binding, key id, signature) already verified: Ed25519 verification once per session
        # and caller, not once per call. Bounded; safe because bindings never repeat.
        self._verified: OrderedDict[tuple[bytes, str, bytes], Caller] = OrderedDict()

    async def __call__(self, ctx: CallContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        if ctx.method in self._public:
            return await call_next()
        caller = self._authenticate(ctx)
        allowed = self._method_roles.get(ctx.method)
        if allowed is None:
            raise _denied(Status.PERMISSION_DENIED, f"no rule allows {ctx.method}")
        if ANY_CALLER not in allowed and not (allowed & caller.roles):
            needed = " or ".join(sorted(allowed))
            raise _denied(
                Status.PERMISSION_DENIED,
                f"caller {caller.key_id!r} may not call {ctx.method} (needs role {needed})",
            )
        token = _current.set(caller)
        try:
            return await call_next()
        finally:
            _current.reset(token)

    def _authenticate(self, ctx: CallContext) -> Caller:
        metadata = ctx.metadata
        key_id = metadata.get(METADATA_KEY_ID)
        signature = metadata.get(METADATA_SIGNATURE)
        if key_id is None or signature is None:
            raise _denied(
                Status.UNAUTHENTICATED,
                f"{ctx.method} needs an authenticated caller: no {METADATA_KEY_ID}/"
                f"{METADATA_SIGNATURE} in the call metadata (see vrpc.auth.SessionSigner)",
            )
        if not isinstance(key_id, str) or not isinstance(signature, bytes):
            raise _denied(Status.UNAUTHENTICATED, "caller credentials are malformed")
        binding = ctx.peer.channel_binding
        if not binding:
            raise _denied(
                Status.UNAUTHENTICATED,
                "caller authentication needs an attested session (no channel binding)",
            )
        cache_key = (binding, key_id, signature)
        known = self._verified.get(cache_key)
        if known is not None:
            return known
        trusted = self._callers.get(key_id)
        if trusted is None:
            shown = key_id[:_MAX_KEY_ID_CHARS]
            raise _denied(Status.UNAUTHENTICATED, f"unknown caller key {shown!r}")
        try:
            trusted.public_key.verify(signature, CONTEXT + binding)
        except InvalidSignature:
            raise _denied(
                Status.UNAUTHENTICATED,
                f"caller {key_id!r}: the signature does not match this session's channel binding",
            ) from None
        caller = Caller(key_id, trusted.roles)
        self._verified[cache_key] = caller
        if len(self._verified) > _VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return caller


class SessionSigner(ClientInterceptor):
    """Client interceptor: sign each session's channel binding with the caller's key and send it
    with every call. ``attach`` the client it is installed on::

        signer = vrpc.auth.SessionSigner("ops", private_key)
        client = signer.attach(vrpc.connect(uri, policy=p, root=r, interceptors=[signer]))

    When the session changed between signing and sending (a reconnect), the server refuses the
    stale signature before running anything; the call is then signed again and sent once more.
    """

    def __init__(self, key_id: str, private_key: Ed25519PrivateKey) -> None:
        self.key_id = key_id
        self._private_key = private_key
        self._client: Client | None = None
        self._signed: tuple[bytes, bytes] | None = None  # (binding, signature)

    def attach(self, client: Client) -> Client:
        self._client = client
        return client

    def _signature(self, binding: bytes) -> bytes:
        if self._signed is None or self._signed[0] != binding:
            self._signed = (binding, self._private_key.sign(CONTEXT + binding))
        return self._signed[1]

    async def _sign_into(self, metadata: dict[str, Any]) -> bytes:
        if self._client is None:
            raise RuntimeError("SessionSigner is not attached: call signer.attach(client)")
        await self._client.connect()
        binding = self._client.channel_binding
        metadata[METADATA_KEY_ID] = self.key_id
        metadata[METADATA_SIGNATURE] = self._signature(binding)
        return binding

    async def intercept(
        self, method: str, metadata: dict[str, Any], call_next: Callable[[], Any]
    ) -> Any:
        binding = await self._sign_into(metadata)
        try:
            return await call_next()
        except RpcError as exc:
            assert self._client is not None
            if exc.status is not Status.UNAUTHENTICATED or self._client.channel_binding == binding:
                raise
        await self._sign_into(metadata)
        return await call_next()

    async def intercept_stream(
        self,
        method: str,
        metadata: dict[str, Any],
        call_next: Callable[[], AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        # Signed like a unary call; not sent again after a refusal (its request items may be
        # consumed already), so a stream that meets a reconnect fails with UNAUTHENTICATED.
        await self._sign_into(metadata)
        items = call_next()
        try:
            async for item in items:
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
