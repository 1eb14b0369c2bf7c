"""AWS credentials for the enclave, served by the parent over vsock.

The enclave cannot reach the instance metadata service, so the parent hands it the instance
role's temporary credentials. The protocol is one exchange per connection:

* enclave -> parent: the 13 bytes ``b"VRPC-CREDS/1\\n"``
* parent -> enclave: 4-byte big-endian length, then JSON (at most 16 KiB)
  ``{"AccessKeyId": str, "SecretAccessKey": str, "Token": str | null, "Expiration": float | null}``
  (``Expiration`` in Unix seconds), then the parent closes.

The parent is untrusted, and these credentials give it nothing it does not have already: the
KMS key policy (``deploy/kms-key-policy.json``) requires the enclave's attestation
(``kms:RecipientAttestation:ImageSha384``), so a KMS answer is only useful inside the measured
enclave, and ``KmsClient`` refuses credentials whose characters AWS never issues. Run the
parent side with ``python -m services.keyvault.credentials --port 8002`` (listens on
``vsock://ANY:8002``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from services.keyvault.forward import Connector
from services.keyvault.kms import AwsCredentials

__all__ = [
    "REQUEST",
    "CredentialsError",
    "ParentCredentials",
    "botocore_source",
    "decode_credentials",
    "encode_credentials",
    "handle_client",
    "main",
]

log = structlog.get_logger("vrpc.keyvault.credentials")

REQUEST = b"VRPC-CREDS/1\n"
_MAX_REPLY = 16 * 1024
_LENGTH = struct.Struct(">I")
_REFRESH_MARGIN = 300.0  # refresh this long before expiry (STS credentials live >= 15 min)
_TIMEOUT = 5.0


class CredentialsError(Exception):
    """The parent's credentials answer is missing or malformed."""


def encode_credentials(creds: AwsCredentials) -> bytes:
    body = json.dumps(
        {
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.session_token,
            "Expiration": creds.expiration_epoch,
        }
    ).encode()
    return _LENGTH.pack(len(body)) + body


def decode_credentials(body: bytes) -> AwsCredentials:
    try:
        obj = json.loads(body)
    except ValueError:
        raise CredentialsError("credentials reply is not JSON") from None
    if not isinstance(obj, dict):
        raise CredentialsError("credentials reply is not a JSON object")
    key, secret = obj.get("AccessKeyId"), obj.get("SecretAccessKey")
    token, expiration = obj.get("Token"), obj.get("Expiration")
    if not (isinstance(key, str) and key and isinstance(secret, str) and secret):
        raise CredentialsError("credentials reply lacks AccessKeyId/SecretAccessKey")
    if token is not None and not isinstance(token, str):
        raise CredentialsError("Token is not a string")
    if expiration is not None and not isinstance(expiration, int | float):
        raise CredentialsError("Expiration is not a number")
    return AwsCredentials(key, secret, token, None if expiration is None else float(expiration))


class ParentCredentials:
    """Enclave side: fetch from the parent, cache until shortly before expiry."""

    def __init__(self, connector: Connector, *, clock: Callable[[], float] = time.time) -> None:
        self._connector = connector
        self._clock = clock
        self._cached: AwsCredentials | None = None
        self._lock = asyncio.Lock()

    async def credentials(self) -> AwsCredentials:
        async with self._lock:
            cached = self._cached
            if cached is not None and (
                cached.expiration_epoch is None
                or cached.expiration_epoch - _REFRESH_MARGIN > self._clock()
            ):
                return cached
            self._cached = await self._fetch()
            return self._cached

    async def _fetch(self) -> AwsCredentials:
        async with asyncio.timeout(_TIMEOUT):
            reader, writer = await self._connector()
            try:
                writer.write(REQUEST)
                await writer.drain()
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if length > _MAX_REPLY:
                    raise CredentialsError(f"credentials reply of {length} bytes is too large")
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise CredentialsError("parent closed before sending credentials") from None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        creds = decode_credentials(body)
        log.info("credentials fetched from parent", expires=creds.expiration_epoch)
        return creds


CredentialsSource = Callable[[], AwsCredentials]


def botocore_source() -> AwsCredentials:
    """Parent side: the instance's credentials via botocore's chain (instance role via IMDS)."""
    import botocore.session

    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        raise CredentialsError("no AWS credentials on the parent (instance role attached?)")
    frozen = creds.get_frozen_credentials()
    expiry: Any = getattr(creds, "_expiry_time", None)
    return AwsCredentials(
        frozen.access_key,
        frozen.secret_key,
        frozen.token,
        expiry.timestamp() if expiry is not None else None,
    )


async def handle_client(
    source: CredentialsSource, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Parent side: answer one request (anything else gets the connection closed)."""
    try:
        async with asyncio.timeout(_TIMEOUT):
            request = await reader.readexactly(len(REQUEST))
            if request != REQUEST:
                log.warning("bad credentials request")
                return
            creds = await asyncio.to_thread(source)
            writer.write(encode_credentials(creds))
            await writer.drain()
            log.info("credentials served")
    except (TimeoutError, asyncio.IncompleteReadError, OSError, CredentialsError) as exc:
        log.warning("credentials request failed", error=type(exc).__name__)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _serve_vsock(port: int, source: CredentialsSource) -> None:
    # The parent runs this under stdlib asyncio, which accepts AF_VSOCK listeners as they are.
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    server = await asyncio.start_server(
        lambda r, w: handle_client(source, r, w), sock=sock, limit=1024
    )
    log.info("credentials provider listening", port=port)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.keyvault.credentials",
        description="Serve the instance role's AWS credentials to enclaves over vsock.",
    )
    parser.add_argument("--port", type=int, default=8002, help="vsock port (default 8002)")
    args = parser.parse_args(argv)
    asyncio.run(_serve_vsock(args.port, botocore_source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
