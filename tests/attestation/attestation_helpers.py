"""Helpers for the attestation tests: recorded vectors and a tiny CBOR encoder.

The encoder is deliberately separate from cbor2 so that mutated documents are built by code that
is not the code under test, and so that definite/indefinite framing is under the test's control.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2
import pytest

VECTORS = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors"
ATTESTATION_VECTORS = VECTORS / "attestation"
NSM_VECTORS = VECTORS / "nsm"

GENUINE = ("blocky_nitro_attestation.cbor", "evervault_beta_valid.cbor")
DEBUG = (
    "blocky_nitro_attestation_debug.cbor",
    "evervault_beta_debug.cbor",
    "eternis_debug_2024-09-17.cbor",
)
BAD_SIGNATURE = "eternis_BAD_sig_2024-07-23.cbor"
SELF_SIGNED = "blocky_selfsigned_NOT_NITRO.cbor"
ALL_DOCUMENTS = (*GENUINE, *DEBUG, BAD_SIGNATURE, SELF_SIGNED)


def vector(name: str, folder: Path = ATTESTATION_VECTORS) -> bytes:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"test vectors not found: {path} (expected ../shared/vectors beside the repo)")
    return path.read_bytes()


def document_time(document: bytes) -> datetime:
    """The document's own timestamp, read without verification (the --at-document-time rule)."""
    payload = cbor2.loads(cbor2.loads(document)[2])
    return datetime.fromtimestamp(payload["timestamp"] / 1000, tz=UTC)


# -- a minimal CBOR encoder (RFC 8949 §3) ---------------------------------------------------


def head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, value)
    raise ValueError(value)


def enc(value: Any, *, indefinite: bool = False) -> bytes:
    """Encode ints, bytes, str, None, bool, lists, dicts or pre-encoded ``Raw`` items."""
    if isinstance(value, Raw):
        return value.data
    if value is None:
        return b"\xf6"
    if value is True or value is False:
        return b"\xf5" if value else b"\xf4"
    if isinstance(value, int):
        return head(0, value) if value >= 0 else head(1, -1 - value)
    if isinstance(value, bytes):
        return head(2, len(value)) + value
    if isinstance(value, str):
        raw = value.encode()
        return head(3, len(raw)) + raw
    if isinstance(value, list | tuple):
        return head(4, len(value)) + b"".join(enc(v) for v in value)
    if isinstance(value, dict):
        return enc_map(list(value.items()), indefinite=indefinite)
    raise TypeError(type(value))


def enc_map(items: list[tuple[Any, Any]], *, indefinite: bool = False) -> bytes:
    """A map from a list of pairs, so duplicate keys can be written on purpose."""
    body = b"".join(enc(k) + enc(v) for k, v in items)
    return (b"\xbf" + body + b"\xff") if indefinite else head(5, len(items)) + body


class Raw:
    """An already encoded item, inserted verbatim."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def split(document: bytes) -> tuple[bytes, Any, bytes, bytes]:
    protected, unprotected, payload, signature = cbor2.loads(document)
    return protected, unprotected, payload, signature


def payload_items(document: bytes) -> list[tuple[str, Any]]:
    return list(cbor2.loads(split(document)[2]).items())


def rebuild(
    document: bytes,
    *,
    items: list[tuple[Any, Any]] | None = None,
    payload: bytes | None = None,
    protected: bytes | None = None,
    unprotected: Any = None,
    signature: bytes | None = None,
    indefinite: bool = False,
) -> bytes:
    """Re-assemble a COSE_Sign1 with some parts replaced (the signature is kept unless given)."""
    p, u, pl, s = split(document)
    if items is not None:
        pl = enc_map(items, indefinite=indefinite)
    if payload is not None:
        pl = payload
    return enc(
        [
            protected if protected is not None else p,
            Raw(enc(unprotected if unprotected is not None else u)),
            pl,
            signature if signature is not None else s,
        ]
    )


def with_field(document: bytes, name: str, value: Any) -> bytes:
    items = [(k, value if k == name else v) for k, v in payload_items(document)]
    return rebuild(document, items=items)
