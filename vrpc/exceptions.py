"""Every exception vrpc raises, grouped by who is at fault.

::

    VrpcError
    ├── RpcError(status, message, details)   an RPC ended with a non-OK status. Handlers raise it
    │                                         for expected failures; clients receive it. Travels on
    │                                         the wire as an ERROR message.
    ├── ProtocolError
    │   ├── LocalProtocolError                this process misused the API (a bug on our side)
    │   └── RemoteProtocolError               the peer sent bytes that break the protocol: the
    │       │                                 connection is closed, the server keeps serving
    │       └── FrameTooLarge                 a length prefix above the configured maximum
    ├── HandshakeError                        the session could not be established (bad message,
    │   │                                     failed key confirmation, timeout). Never retried
    │   │                                     silently, never falls back to plaintext.
    │   └── HandshakeAlert                    the peer ended the handshake with an ALERT (``alert``)
    ├── AttestationError                      the peer's attestation document is not acceptable
    │   ├── MalformedDocument                 not a well-formed Nitro COSE_Sign1 document
    │   ├── SignatureInvalid                  the COSE signature does not verify
    │   ├── ChainInvalid                      the certificate chain does not reach the pinned root
    │   │   └── CertificateExpired            ...because a certificate is outside its validity
    │   ├── PolicyViolation                   PCRs, debug mode, freshness, module id
    │   └── BindingMismatch                   nonce, public key or user data differ from expected
    ├── NsmError                              the /dev/nsm device refused or is absent
    └── TransportError                        the operating system's socket layer failed
        └── ConnectError                      could not connect (after retries)

The application-level error (``RpcError``) is deliberately separate from protocol and transport
errors: a handler's *unexpected* exception never crosses the wire as itself, the client sees
``RpcError(Status.INTERNAL, "internal error")`` and the traceback is only logged on the server.
"""

from __future__ import annotations

from typing import Any

from vrpc.status import Status

__all__ = [
    "AttestationError",
    "BindingMismatch",
    "CertificateExpired",
    "ChainInvalid",
    "ConnectError",
    "FrameTooLarge",
    "HandshakeAlert",
    "HandshakeError",
    "LocalProtocolError",
    "MalformedDocument",
    "NsmError",
    "PolicyViolation",
    "ProtocolError",
    "RemoteProtocolError",
    "RpcError",
    "SignatureInvalid",
    "TransportError",
    "VrpcError",
]


class VrpcError(Exception):
    """Base of every vrpc exception."""


class RpcError(VrpcError):
    """An RPC finished with a non-OK status.

    ``details`` is any msgpack-serialisable value the handler wants the caller to see
    (for example the offending field); keep secrets and payloads out of it.
    """

    def __init__(self, status: Status, message: str = "", details: Any = None) -> None:
        self.status = Status(status)
        self.message = message
        self.details = details
        super().__init__(status, message, details)

    def __str__(self) -> str:
        text = f"{self.status.name}: {self.message}" if self.message else self.status.name
        if self.details is not None:
            text += f" ({self.details!r})"
        return text

    def __repr__(self) -> str:
        return f"RpcError({self.status.name}, {self.message!r}, {self.details!r})"


class ProtocolError(VrpcError):
    """The vrpc protocol was broken, by us (Local) or by the peer (Remote)."""

    status: Status = Status.INTERNAL


class LocalProtocolError(ProtocolError):
    """This process tried something the protocol does not allow (an API misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; the connection is closed."""

    status = Status.UNAVAILABLE


class FrameTooLarge(RemoteProtocolError):
    """A frame's length prefix exceeds the configured maximum (checked before allocating)."""

    status = Status.RESOURCE_EXHAUSTED


class HandshakeError(VrpcError):
    """The attested session could not be established."""


class HandshakeAlert(HandshakeError):
    """The peer ended the handshake with an ALERT; ``alert`` is its code (None if unknown)."""

    def __init__(self, message: str, alert: Any = None) -> None:
        super().__init__(message)
        self.alert = alert


class AttestationError(VrpcError):
    """The attestation document was rejected. The message says what was expected and found."""


class MalformedDocument(AttestationError):
    """The bytes are not a well-formed Nitro attestation document."""


class SignatureInvalid(AttestationError):
    """The COSE_Sign1 signature does not verify with the leaf certificate's key."""


class ChainInvalid(AttestationError):
    """The certificate chain does not verify up to the trusted root."""


class CertificateExpired(ChainInvalid):
    """A certificate in the chain is not valid at the verification time."""


class PolicyViolation(AttestationError):
    """The document is genuine but the policy refuses it (PCRs, debug mode, freshness)."""


class BindingMismatch(AttestationError):
    """The document does not carry the nonce, public key or user data the caller expects."""


class NsmError(VrpcError):
    """The Nitro Secure Module device is absent or answered with an error."""


class TransportError(VrpcError):
    """The socket layer failed."""


class ConnectError(TransportError):
    """Could not connect to the address (after the configured retries)."""
