"""Addresses as URIs: ``vsock://CID:PORT``, ``unix:///path``, ``tcp://host:port``, ``memory://name``.

``vsock://ANY:PORT`` listens on every CID (VMADDR_CID_ANY); ``LOCAL`` is CID 1 (loopback inside a
VM), ``HOST`` is CID 2 and ``PARENT`` is CID 3 (the Nitro parent instance as seen from an enclave).
"""

from __future__ import annotations

import dataclasses
import urllib.parse

__all__ = ["Address", "parse_address"]

VMADDR_CID_ANY = 0xFFFFFFFF
_CID_NAMES = {"ANY": VMADDR_CID_ANY, "LOCAL": 1, "HOST": 2, "PARENT": 3}
_SCHEMES = ("vsock", "unix", "tcp", "memory")


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = 0

    def __str__(self) -> str:
        if self.scheme == "vsock":
            name = next((k for k, v in _CID_NAMES.items() if v == self.cid), str(self.cid))
            return f"vsock://{name}:{self.port}"
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme == "memory":
            return f"memory://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def _port(text: str | None, uri: str) -> int:
    if not text or not text.isdigit() or not 0 <= int(text) <= 0xFFFFFFFF:
        raise ValueError(f"{uri!r}: expected a numeric port")
    return int(text)


def parse_address(uri: str | Address) -> Address:
    """Parse an address URI; raises ValueError with the reason for anything else."""
    if isinstance(uri, Address):
        return uri
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(f"{uri!r}: expected one of {', '.join(s + '://' for s in _SCHEMES)}")
    if scheme == "unix":
        if not rest.startswith("/") and not rest.startswith("@"):
            raise ValueError(f"{uri!r}: a unix address needs an absolute path (unix:///run/x.sock)")
        return Address("unix", path=urllib.parse.unquote(rest))
    if scheme == "memory":
        if not rest:
            raise ValueError(f"{uri!r}: a memory address needs a name")
        return Address("memory", path=rest)
    host, colon, port_text = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{uri!r}: expected {scheme}://HOST:PORT")
    if scheme == "vsock":
        port = _port(port_text, uri)
        name = host.upper()
        if name in _CID_NAMES:
            cid = _CID_NAMES[name]
        elif host.isdigit() and int(host) <= 0xFFFFFFFF:
            cid = int(host)
        else:
            raise ValueError(f"{uri!r}: CID must be a number or one of {', '.join(_CID_NAMES)}")
        return Address("vsock", port=port, cid=cid)
    port = _port(port_text, uri)
    if port > 65535:
        raise ValueError(f"{uri!r}: TCP port above 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Address("tcp", host=host, port=port)
