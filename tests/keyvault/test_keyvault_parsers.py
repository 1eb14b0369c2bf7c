"""Parsers of untrusted bytes fail only with their own error type (hypothesis)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.keyvault import KeyType
from services.keyvault.sealing import SealedBlob, SealedFormatError
from services.keyvault.store import StoreFormatError, dump_keys, generate, load_keys


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_store_random_bytes(data: bytes) -> None:
    try:
        load_keys(data)
    except StoreFormatError:
        pass


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_store_random_structures(value: object) -> None:
    try:
        load_keys(msgpack.packb([1, [value]]))
    except StoreFormatError:
        pass


def test_store_roundtrip_and_refusals() -> None:
    keys = [generate(t, f"l{t.value}", 5) for t in KeyType]
    again = load_keys(dump_keys(keys))
    assert [k.info for k in again] == [k.info for k in keys]
    assert all(a.same_material(b) for a, b in zip(again, keys, strict=True))
    row = [keys[0].info.key_id, "ecdsa-p256", None, 0, b"\xff" * 32]  # scalar >= n
    for bad in ([1, [row]], [1, [[*row[:4], b"\x01" * 32]] * 2], [2, []], [1, [row[:4]]]):
        with pytest.raises(StoreFormatError):
            load_keys(msgpack.packb(bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_sealed_blob_random_bytes(data: bytes) -> None:
    try:
        SealedBlob.parse(data).decrypt(bytes(32))
    except SealedFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_sealed_blob_any_flip_is_detected(pos: int, mask: int) -> None:
    blob = bytearray(SealedBlob.encrypt(bytes(32), b"kms", b"store", 1))
    blob[pos % len(blob)] ^= mask
    with pytest.raises(SealedFormatError):
        SealedBlob.parse(bytes(blob)).decrypt(bytes(32))
