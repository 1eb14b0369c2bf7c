"""Hypothesis: whatever the bytes, the verifier answers with an AttestationError or with Claims."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from attestation_helpers import document_time, vector
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrpc.attestation import verify_document
from vrpc.attestation._document import _parse_payload
from vrpc.exceptions import AttestationError, MalformedDocument

NOW = datetime(2024, 9, 7, 14, 37, 40, tzinfo=UTC)
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def genuine() -> bytes:
    return vector("blocky_nitro_attestation.cbor")


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_only_raise_attestation_errors(data: bytes) -> None:
    with pytest.raises(AttestationError):
        verify_document(data, now=NOW)


@FUZZ
@given(st.binary(max_size=512))
def test_random_payloads_only_raise_malformed(data: bytes) -> None:
    try:
        _parse_payload(data)
    except MalformedDocument:
        pass


CBOR_ITEMS = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.binary(max_size=64)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 40), children, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(CBOR_ITEMS)
def test_structured_cbor_only_raises_attestation_errors(item: object) -> None:
    import cbor2

    with pytest.raises(AttestationError):
        verify_document(cbor2.dumps(item), now=NOW)


def test_every_truncation_is_malformed(genuine: bytes) -> None:
    at = document_time(genuine)
    for length in range(len(genuine)):
        with pytest.raises(MalformedDocument):
            verify_document(genuine[:length], now=at)


@FUZZ
@given(st.data())
def test_single_byte_changes_are_rejected(genuine: bytes, data: st.DataObject) -> None:
    at = document_time(genuine)
    index = data.draw(st.integers(0, len(genuine) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda b: b != genuine[index]))
    mutated = genuine[:index] + bytes([value]) + genuine[index + 1 :]
    with pytest.raises(AttestationError):
        verify_document(mutated, now=at)


# Byte changes hypothesis once found that made cryptography raise something other than
# ValueError (lazy field parsing, unknown key type, invalid version, a deprecation warning).
@pytest.mark.parametrize(("index", "value"), [(3020, 0), (1308, 0), (1599, 128), (944, 1)])
def test_certificate_corruptions_found_by_fuzzing(genuine: bytes, index: int, value: int) -> None:
    mutated = genuine[:index] + bytes([value]) + genuine[index + 1 :]
    with pytest.raises(AttestationError):
        verify_document(mutated, now=document_time(genuine))
