"""The enclave side of ``keyvault.v1``.

Run in the enclave with ``vrpc serve services.keyvault.impl:create_server --listen
vsock://ANY:5000``. Configuration comes from the environment (set in the enclave image):

``VRPC_KMS_KEY_ID``        full ARN of the KMS key used for sealing (an alias or bare key id is
                           refused at start); unset: seal/unseal refuse
``VRPC_KMS_REGION``        must equal the ARN's region when set (the ARN's region is used)
``VRPC_KMS_ENDPOINT``      default ``https://kms.REGION.amazonaws.com``
``VRPC_KMS_PROXY_PORT``    parent's vsock-proxy port for KMS (default 8000)
``VRPC_CREDENTIALS_PORT``  parent's credentials port (default 8002)
``VRPC_KEYVAULT_CALLERS``  path of the trusted callers file (``vrpc.auth.load_callers``
                           format); required: without it the server refuses to start

Callers (``vrpc.auth``): every call is signed by a caller key listed in the image. Roles:
``admin`` may ``create_key``, ``delete_key``, ``seal`` and ``unseal``; ``signer:KEY_ID`` (or
``signer:*`` for every key) may ``sign``, ``encrypt`` and ``decrypt`` with that key; any listed
caller may ``list_keys``, ``public_key`` and ``verify`` (public information).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import TYPE_CHECKING, Any, NoReturn

import structlog
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.keyvault import store
from services.keyvault.cms import EnvelopeError
from services.keyvault.interface import (
    MAX_KEYS,
    MAX_LABEL_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_SEALED_BYTES,
    KeyInfo,
    KeyType,
    KeyVault,
)
from services.keyvault.kms import KmsError
from services.keyvault.sealing import (
    Attester,
    KeyArn,
    KeyIdentityError,
    SealedFormatError,
    Sealer,
)
from vrpc.auth import ANY_CALLER, CallerAuthenticator, TrustedCaller, current_caller, load_callers
from vrpc.exceptions import RpcError
from vrpc.status import Status

if TYPE_CHECKING:
    from vrpc.server import Server

__all__ = [
    "ADMIN",
    "METHOD_ROLES",
    "KeyVaultImpl",
    "authenticator",
    "callers_from_env",
    "create_server",
    "sealer_from_env",
]

log = structlog.get_logger("vrpc.keyvault")

_CIPHERTEXT_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
_MAX_KEY_ID_CHARS = 64

ADMIN = "admin"
_ADMIN_ONLY = {ADMIN}
_ANY = {ANY_CALLER}
#: Roles per method (``vrpc.auth.CallerAuthenticator``); key use is further checked per key.
METHOD_ROLES = {
    f"{KeyVault.service_name}.{method}": roles
    for method, roles in {
        "create_key": _ADMIN_ONLY,
        "delete_key": _ADMIN_ONLY,
        "seal": _ADMIN_ONLY,
        "unseal": _ADMIN_ONLY,
        "list_keys": _ANY,
        "public_key": _ANY,
        "verify": _ANY,
        "sign": _ANY,
        "encrypt": _ANY,
        "decrypt": _ANY,
    }.items()
}


class KeyVaultImpl(KeyVault):
    """Keys in enclave memory. ``sealer`` (usually a ``KmsSealer``) enables seal/unseal.

    With ``check_key_use`` every ``sign``, ``encrypt`` and ``decrypt`` needs an authenticated
    caller (``vrpc.auth.current_caller``) holding ``signer:KEY_ID`` or ``signer:*``;
    ``create_server`` always sets it. Without it (in-process use) there is no caller to check.
    """

    def __init__(
        self, *, sealer: Sealer | None = None, max_keys: int = MAX_KEYS, check_key_use: bool = False
    ) -> None:
        self._check_key_use = check_key_use
        self._keys: dict[str, store.Key] = {}
        self._sealer = sealer
        self._max_keys = max_keys
        # seal/unseal await KMS; serialise them so an unseal cannot interleave with a seal.
        self._seal_lock = asyncio.Lock()
        # The highest store generation seen (own seals, the unsealed store): never go below it.
        self._generation = 0
        # Set by the first create_key, seal or unseal: from then on unseal would merge or
        # replace a live store, which is how deleted keys come back. Only a fresh enclave unseals.
        self._started = False

    async def create_key(self, key_type: KeyType, label: str | None = None) -> KeyInfo:
        kind = _key_type(key_type)
        if label is not None and len(label) > MAX_LABEL_CHARS:
            _fail(
                Status.INVALID_ARGUMENT,
                f"label is {len(label)} characters, at most {MAX_LABEL_CHARS} allowed",
                param="label",
                max_chars=MAX_LABEL_CHARS,
            )
        if len(self._keys) >= self._max_keys:
            _fail(
                Status.RESOURCE_EXHAUSTED,
                f"the vault holds {self._max_keys} keys already; delete some first",
                param="key_type",
                max_keys=self._max_keys,
            )
        key = store.generate(kind, label, int(time.time() * 1000))
        self._started = True
        self._keys[key.info.key_id] = key
        log.info("key created", key_id=key.info.key_id, key_type=kind.value)
        return key.info

    async def list_keys(self) -> list[KeyInfo]:
        return [k.info for k in self._keys.values()]

    async def delete_key(self, key_id: str) -> None:
        self._get(key_id)
        del self._keys[key_id]
        log.info("key deleted", key_id=key_id)

    async def public_key(self, key_id: str) -> bytes:
        return self._signing_key(key_id, "public_key").public_key_der()

    async def sign(self, key_id: str, message: bytes) -> bytes:
        key = self._signing_key(key_id, "sign")
        self._authorize_use(key_id, "sign")
        _check_size("message", message)
        if key.info.key_type is KeyType.ED25519:
            return key.ed25519().sign(message)
        return key.ecdsa().sign(message, ec.ECDSA(hashes.SHA256()))

    async def verify(self, key_id: str, message: bytes, signature: bytes) -> bool:
        key = self._signing_key(key_id, "verify")
        _check_size("message", message)
        _check_size("signature", signature, limit=1024)
        try:
            if key.info.key_type is KeyType.ED25519:
                key.ed25519().public_key().verify(signature, message)
            else:
                key.ecdsa().public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            # Malformed DER or wrong length is just "not a valid signature" to the caller.
            return False
        return True

    async def encrypt(self, key_id: str, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        key = self._aead_key(key_id, "encrypt")
        self._authorize_use(key_id, "encrypt")
        _check_size("plaintext", plaintext)
        _check_size("associated_data", associated_data)
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(key.material).encrypt(nonce, plaintext, associated_data)
        return bytes([_CIPHERTEXT_VERSION]) + nonce + sealed

    async def decrypt(self, key_id: str, ciphertext: bytes, associated_data: bytes = b"") -> bytes:
        key = self._aead_key(key_id, "decrypt")
        self._authorize_use(key_id, "decrypt")
        _check_size("ciphertext", ciphertext, limit=MAX_MESSAGE_BYTES + 1 + _NONCE_BYTES + 16)
        _check_size("associated_data", associated_data)
        if len(ciphertext) < 1 + _NONCE_BYTES + _TAG_BYTES or ciphertext[0] != _CIPHERTEXT_VERSION:
            _fail(
                Status.INVALID_ARGUMENT,
                "ciphertext is not a keyvault AES-256-GCM ciphertext (version 1, nonce, tag)",
                param="ciphertext",
            )
        nonce = ciphertext[1 : 1 + _NONCE_BYTES]
        try:
            body = ciphertext[1 + _NONCE_BYTES :]
            return AESGCM(key.material).decrypt(nonce, body, associated_data)
        except InvalidTag:
            _fail(
                Status.INVALID_ARGUMENT,
                f"ciphertext does not authenticate under key {key_id} with this associated_data",
                param="ciphertext",
            )

    async def seal(self) -> bytes:
        sealer = self._require_sealer()
        async with self._seal_lock:
            payload = store.dump_keys(self._keys.values())
            generation = self._generation + 1
            try:
                sealed = await sealer.seal(payload, generation)
            except (KmsError, EnvelopeError, SealedFormatError, KeyIdentityError) as exc:
                _sealing_failed("seal", exc)
            self._generation = generation
            self._started = True
            log.info("key store sealed", generation=generation, keys=len(self._keys))
            return sealed

    async def unseal(self, sealed: bytes, min_generation: int = 0) -> list[KeyInfo]:
        sealer = self._require_sealer()
        _check_size("sealed", sealed, limit=MAX_SEALED_BYTES)
        if not isinstance(min_generation, int) or min_generation < 0:
            _fail(Status.INVALID_ARGUMENT, "min_generation must be >= 0", param="min_generation")
        async with self._seal_lock:
            if self._started:
                _fail(
                    Status.FAILED_PRECONDITION,
                    "unseal is only allowed at start, before any key is created, sealed or "
                    "unsealed: restart the enclave to load a sealed store",
                    param="sealed",
                )
            try:
                generation = sealer.generation(sealed)
            except SealedFormatError as exc:
                _fail(Status.INVALID_ARGUMENT, f"sealed blob refused: {exc}", param="sealed")
            floor = max(min_generation, self._generation)
            if generation < floor:
                _fail(
                    Status.FAILED_PRECONDITION,
                    f"sealed store is generation {generation}, older than generation {floor} "
                    "already seen: refusing to roll the key store back",
                    param="sealed",
                    generation=generation,
                    min_generation=floor,
                )
            try:
                generation, payload = await sealer.unseal(sealed)
                keys = store.load_keys(payload)
            except SealedFormatError as exc:
                _fail(Status.INVALID_ARGUMENT, f"sealed blob refused: {exc}", param="sealed")
            except store.StoreFormatError as exc:
                _fail(Status.DATA_LOSS, f"sealed key store is corrupt: {exc}", param="sealed")
            except (KmsError, EnvelopeError, KeyIdentityError) as exc:
                _sealing_failed("unseal", exc)
            if len(keys) > self._max_keys:
                _fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"the sealed store holds {len(keys)} keys, more than {self._max_keys}; "
                    "nothing loaded",
                    param="sealed",
                    max_keys=self._max_keys,
                )
            self._keys = {key.info.key_id: key for key in keys}
            self._generation = generation
            self._started = True
            log.info("keys unsealed", generation=generation, total=len(keys))
            return [k.info for k in keys]

    # -- helpers ---------------------------------------------------------------------------

    def _authorize_use(self, key_id: str, operation: str) -> None:
        if not self._check_key_use:
            return
        caller = current_caller()
        if caller is None:
            # Fail closed: a server built without the authenticator has no caller to check.
            _fail(Status.UNAUTHENTICATED, f"{operation} needs an authenticated caller", param=None)
        if f"signer:{key_id}" not in caller.roles and "signer:*" not in caller.roles:
            _fail(
                Status.PERMISSION_DENIED,
                f"caller {caller.key_id!r} may not {operation} with key {key_id} "
                f"(needs role signer:{key_id})",
                param="key_id",
            )

    def _get(self, key_id: str) -> store.Key:
        key = self._keys.get(key_id) if len(key_id) <= _MAX_KEY_ID_CHARS else None
        if key is None:
            shown = key_id if len(key_id) <= _MAX_KEY_ID_CHARS else key_id[:_MAX_KEY_ID_CHARS] + "…"
            _fail(Status.NOT_FOUND, f"no key with id {shown!r}", param="key_id")
        # Plain dict lookup: key ids are not secrets (list_keys returns them).
        return key

    def _signing_key(self, key_id: str, operation: str) -> store.Key:
        key = self._get(key_id)
        if not key.info.key_type.signs:
            _wrong_type(key, operation, (KeyType.ED25519, KeyType.ECDSA_P256))
        return key

    def _aead_key(self, key_id: str, operation: str) -> store.Key:
        key = self._get(key_id)
        if not key.info.key_type.encrypts:
            _wrong_type(key, operation, (KeyType.AES_256_GCM,))
        return key

    def _require_sealer(self) -> Sealer:
        if self._sealer is None:
            _fail(
                Status.FAILED_PRECONDITION,
                "sealing is not configured in this enclave (set VRPC_KMS_KEY_ID)",
                param=None,
            )
        assert self._sealer is not None
        return self._sealer


def _fail(status: Status, message: str, *, param: str | None, **details: Any) -> NoReturn:
    raise RpcError(status, message, {"param": param, **details})


def _key_type(value: str) -> KeyType:
    try:
        return KeyType(value)
    except ValueError:
        allowed = ", ".join(t.value for t in KeyType)
        _fail(
            Status.INVALID_ARGUMENT,
            f"unknown key_type {value!r}; expected one of {allowed}",
            param="key_type",
        )


def _check_size(param: str, value: bytes, *, limit: int = MAX_MESSAGE_BYTES) -> None:
    if len(value) > limit:
        _fail(
            Status.INVALID_ARGUMENT,
            f"{param} is {len(value)} bytes, at most {limit} allowed",
            param=param,
            max_bytes=limit,
            got_bytes=len(value),
        )


def _wrong_type(key: store.Key, operation: str, expected: tuple[KeyType, ...]) -> NoReturn:
    names = " or ".join(t.value for t in expected)
    _fail(
        Status.FAILED_PRECONDITION,
        f"key {key.info.key_id} is {key.info.key_type.value}; {operation} needs {names}",
        param="key_id",
        key_type=key.info.key_type.value,
        expected=[t.value for t in expected],
    )


def _sealing_failed(operation: str, exc: Exception) -> NoReturn:
    log.warning("sealing failed", operation=operation, error=type(exc).__name__)
    if isinstance(exc, KmsError):
        if exc.code == "AccessDeniedException":
            status = Status.PERMISSION_DENIED
        elif exc.code in ("InvalidCiphertextException", "IncorrectKeyException"):
            status = Status.INVALID_ARGUMENT
        elif exc.retryable:
            status = Status.UNAVAILABLE
        else:
            status = Status.FAILED_PRECONDITION
        raise RpcError(status, f"{operation}: {exc}", {"param": None, "kms_code": exc.code})
    if isinstance(exc, KeyIdentityError):
        raise RpcError(Status.FAILED_PRECONDITION, f"{operation}: {exc}", {"param": None})
    raise RpcError(Status.INTERNAL, f"{operation}: {exc}", {"param": None}) from exc


def sealer_from_env(attester: Attester, environ: dict[str, str] | None = None) -> Sealer | None:
    """Build the production ``KmsSealer`` from ``VRPC_KMS_*`` variables (None when unset).

    Raises ``KeyIdentityError`` when the key is not a full key ARN or the region disagrees: the
    enclave refuses to start rather than talk to a key the parent could choose.
    """
    from services.keyvault.credentials import ParentCredentials
    from services.keyvault.forward import EnclaveForward, vsock_connector
    from services.keyvault.kms import KmsClient
    from services.keyvault.sealing import KmsSealer

    env = dict(os.environ) if environ is None else environ
    key_id = env.get("VRPC_KMS_KEY_ID")
    if not key_id:
        return None
    arn = KeyArn.parse(key_id)
    region = env.get("VRPC_KMS_REGION") or arn.region
    if region != arn.region:
        raise KeyIdentityError(f"VRPC_KMS_REGION is {region!r} but the key ARN is in {arn.region}")
    endpoint = env.get("VRPC_KMS_ENDPOINT") or f"https://kms.{region}.amazonaws.com"
    proxy_port = int(env.get("VRPC_KMS_PROXY_PORT", "8000"))
    creds_port = int(env.get("VRPC_CREDENTIALS_PORT", "8002"))
    parent = 3  # the parent instance's CID, as seen from any Nitro enclave
    forward = EnclaveForward(vsock_connector(parent, proxy_port), port=proxy_port)
    client = KmsClient(
        endpoint=endpoint,
        region=region,
        credentials=ParentCredentials(vsock_connector(parent, creds_port)),
        route=forward,
    )
    return KmsSealer(client, key_id, attester)


def callers_from_env(environ: dict[str, str] | None = None) -> list[TrustedCaller]:
    """The trusted callers from the file named by ``VRPC_KEYVAULT_CALLERS``.

    Raises ``ValueError`` when it is unset, unreadable, malformed or lists nobody: a keyvault
    that cannot tell its callers apart would obey whoever reaches it, the parent included.
    """
    env = dict(os.environ) if environ is None else environ
    path = env.get("VRPC_KEYVAULT_CALLERS")
    if not path:
        raise ValueError(
            "VRPC_KEYVAULT_CALLERS is not set: the keyvault refuses to start without its "
            "trusted callers (docs/deployment.md)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the trusted callers file {path}: {exc}") from None
    callers = load_callers(data)
    if not callers:
        raise ValueError(f"the trusted callers file {path} lists no caller")
    return callers


def authenticator(callers: list[TrustedCaller]) -> CallerAuthenticator:
    """The keyvault's caller check: ``METHOD_ROLES`` for these callers."""
    return CallerAuthenticator(callers, method_roles=METHOD_ROLES)


def create_server(
    *,
    attester: Attester | None = None,
    callers: list[TrustedCaller] | None = None,
    sealer: Sealer | None = None,
) -> Server:
    """The enclave's server: keyvault behind caller authentication, with the NSM attester.

    ``attester`` replaces the NSM attester (``vrpc serve --insecure-test-attester`` passes the
    test attester on machines without Nitro); ``callers`` replaces ``callers_from_env()``;
    ``sealer`` replaces ``sealer_from_env()`` (tests, a KMS reached another way).
    """
    # Imported here: the server and the NSM driver are enclave-side, and importing this module
    # (tests, tooling, hosts reading the implementation) must need neither.
    from vrpc.attestation import NsmAttester
    from vrpc.server import Server

    trusted = callers_from_env() if callers is None else callers
    if not trusted:
        raise ValueError("the keyvault needs at least one trusted caller")
    chosen: Attester = NsmAttester() if attester is None else attester
    chosen_sealer = sealer_from_env(chosen) if sealer is None else sealer
    vault = KeyVaultImpl(sealer=chosen_sealer, check_key_use=True)
    return Server([vault], attester=chosen, interceptors=[authenticator(trusted)])
