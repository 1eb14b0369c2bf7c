"""vrpc: asyncio RPC for AWS Nitro Enclaves — attested, encrypted, typed.

Declare a service (``vrpc.Service`` + ``@vrpc.rpc``), serve it with ``vrpc.Server``, call it with
``vrpc.connect(...).stub(Interface)``. See README.md and docs/guide.md.
"""

from vrpc._version import __version__
from vrpc.attestation import (
    AWS_NITRO_ROOT,
    Claims,
    InsecureTestAttester,
    NsmAttester,
    Policy,
    TrustRoot,
    Verifier,
)
from vrpc.audit import AuditTrail
from vrpc.client import Client, ClientInterceptor, connect
from vrpc.context import CallContext, CallOptions, Peer, call_options, current_call
from vrpc.exceptions import (
    AttestationError,
    ConnectError,
    HandshakeError,
    ProtocolError,
    RemoteProtocolError,
    RpcError,
    VrpcError,
)
from vrpc.pool import Pool
from vrpc.server import Server, ServerInterceptor
from vrpc.service import InterfaceError, Service, rpc
from vrpc.status import Status

__all__ = [
    "AWS_NITRO_ROOT",
    "AttestationError",
    "AuditTrail",
    "CallContext",
    "CallOptions",
    "Claims",
    "Client",
    "ClientInterceptor",
    "ConnectError",
    "HandshakeError",
    "InsecureTestAttester",
    "InterfaceError",
    "NsmAttester",
    "Peer",
    "Policy",
    "Pool",
    "ProtocolError",
    "RemoteProtocolError",
    "RpcError",
    "Server",
    "ServerInterceptor",
    "Service",
    "Status",
    "TrustRoot",
    "Verifier",
    "VrpcError",
    "__version__",
    "call_options",
    "connect",
    "current_call",
    "rpc",
]
