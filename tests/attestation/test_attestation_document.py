"""verify_document against recorded Nitro documents and systematic mutations of a genuine one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
import pytest
from attestation_helpers import (
    ALL_DOCUMENTS,
    BAD_SIGNATURE,
    DEBUG,
    GENUINE,
    SELF_SIGNED,
    Raw,
    document_time,
    enc,
    enc_map,
    payload_items,
    rebuild,
    split,
    vector,
    with_field,
)

from vrpc.attestation import (
    AWS_NITRO_ROOT,
    AWS_NITRO_ROOT_FINGERPRINT,
    MAX_DOCUMENT_SIZE,
    Claims,
    verify_document,
)
from vrpc.exceptions import (
    AttestationError,
    CertificateExpired,
    ChainInvalid,
    LocalProtocolError,
    MalformedDocument,
    SignatureInvalid,
)

BLOCKY = "blocky_nitro_attestation.cbor"


@pytest.fixture(scope="module")
def genuine() -> bytes:
    return vector(BLOCKY)


def at_own_time(document: bytes, original: bytes | None = None) -> Claims:
    return verify_document(document, now=document_time(original or document))


# -- recorded vectors --------------------------------------------------------------------


@pytest.mark.parametrize("name", GENUINE + DEBUG)
def test_genuine_documents_verify_at_their_own_time(name: str) -> None:
    document = vector(name)
    claims = at_own_time(document)
    assert claims.digest == "SHA384"
    assert claims.timestamp == document_time(document)
    assert claims.module_id.startswith("i-")
    assert len(claims.cabundle) == 4
    assert all(len(v) == 48 for v in claims.pcrs.values())
    assert claims.debug is (name in DEBUG)


@pytest.mark.parametrize("name", GENUINE + DEBUG)
def test_genuine_documents_are_expired_today(name: str) -> None:
    with pytest.raises(CertificateExpired, match=r"leaf certificate \(CN=.*\) is not valid at"):
        verify_document(vector(name), now=datetime.now(UTC))


def test_genuine_document_expired_three_hours_later(genuine: bytes) -> None:
    later = document_time(genuine) + timedelta(hours=4)
    with pytest.raises(CertificateExpired):
        verify_document(genuine, now=later)


def test_claims_fields_of_evervault_valid() -> None:
    claims = at_own_time(vector("evervault_beta_valid.cbor"))
    assert claims.public_key is None and claims.user_data is None
    assert claims.nonce is not None and len(claims.nonce) == 256
    assert claims.timestamp_ms == 1665651482136
    assert not claims.debug


def test_optional_fields_of_blocky(genuine: bytes) -> None:
    claims = at_own_time(genuine)
    assert claims.user_data is not None and len(claims.user_data) == 1024
    assert claims.nonce is not None and len(claims.nonce) == 1024
    assert claims.public_key is not None and len(claims.public_key) == 1024
    assert list(claims.pcrs) == sorted(claims.pcrs)


def test_bad_signature_vector_is_signature_invalid() -> None:
    document = vector(BAD_SIGNATURE)
    with pytest.raises(SignatureInvalid, match="does not verify"):
        at_own_time(document)


def test_self_signed_vector_is_malformed() -> None:
    # MalformedDocument, not ChainInvalid: its unprotected header is CBOR null instead of an
    # empty map and its cabundle is null, so it fails the structure checks before any crypto.
    document = vector(SELF_SIGNED)
    with pytest.raises(MalformedDocument, match="unprotected header"):
        verify_document(document, now=datetime.now(UTC))
    repaired = rebuild(document, unprotected={})
    with pytest.raises(MalformedDocument, match="cabundle is null"):
        verify_document(repaired, now=datetime.now(UTC))


def test_pinned_root_is_the_aws_certificate() -> None:
    assert AWS_NITRO_ROOT.fingerprint == AWS_NITRO_ROOT_FINGERPRINT
    assert AWS_NITRO_ROOT.insecure is False
    der = vector("aws_nitro_root_g1.der")
    from cryptography.hazmat.primitives.serialization import Encoding

    assert AWS_NITRO_ROOT.certificate.public_bytes(Encoding.DER) == der


def test_naive_time_is_an_api_error(genuine: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        verify_document(genuine, now=datetime(2024, 9, 7, 14, 37, 40))


# -- envelope mutations --------------------------------------------------------------------


def test_tag_18_wrapping_is_accepted(genuine: bytes) -> None:
    tagged = head_tag(18) + genuine
    assert at_own_time(tagged, genuine) == at_own_time(genuine)


def head_tag(tag: int) -> bytes:
    return bytes([0xC0 | tag]) if tag < 24 else bytes([0xD8, tag])


def test_other_tags_are_rejected(genuine: bytes) -> None:
    with pytest.raises(MalformedDocument, match="tag 98"):
        at_own_time(head_tag(98) + genuine, genuine)


def test_definite_reencoding_is_byte_identical(genuine: bytes) -> None:
    # Sanity check of the test encoder: the indefinite-length case below differs only in framing.
    assert rebuild(genuine, items=payload_items(genuine)) == genuine


def test_indefinite_reencoding_breaks_the_signature(genuine: bytes) -> None:
    mutated = rebuild(genuine, items=payload_items(genuine), indefinite=True)
    assert split(mutated)[2][0] == 0xBF
    with pytest.raises(SignatureInvalid):
        at_own_time(mutated, genuine)


def test_definite_reencoding_of_an_indefinite_payload_breaks_the_signature(
    genuine: bytes,
) -> None:
    from vrpc.attestation import InsecureTestAttester

    # Test-attester documents are indefinite-length like new NSM ones; re-framing them definite
    # must fail too. The signature check is what runs last, so the chain is irrelevant here.
    document = InsecureTestAttester(nsm_path="/nonexistent/nsm").attest(nonce=b"n")
    assert split(document)[2][0] == 0xBF
    mutated = rebuild(document, items=payload_items(document))
    assert split(mutated)[2][0] != 0xBF
    from cryptography import x509

    from vrpc.attestation._document import _parse_envelope, _verify_signature

    protected, payload, signature = _parse_envelope(mutated)
    leaf = x509.load_der_x509_certificate(cbor2.loads(payload)["certificate"])
    key = leaf.public_key()
    with pytest.raises(SignatureInvalid):
        _verify_signature(key, protected, payload, signature)  # type: ignore[arg-type]


def test_flipped_signature_bit(genuine: bytes) -> None:
    signature = bytearray(split(genuine)[3])
    signature[10] ^= 1
    with pytest.raises(SignatureInvalid):
        at_own_time(rebuild(genuine, signature=bytes(signature)), genuine)


@pytest.mark.parametrize(
    ("protected", "match"),
    [
        (enc({1: -7}), r"expected exactly \{1: -35\}"),
        (enc({1: -35, 4: b"kid"}), r"expected exactly \{1: -35\}"),
        (enc({}), r"expected exactly \{1: -35\}"),
        (enc_map([(1, -35), (1, -35)]), "not well-formed CBOR"),
        (enc({1: "ES384"}), r"expected exactly \{1: -35\}"),
        (b"\xa1\xf5\x38\x22", r"expected exactly \{1: -35\}"),  # key CBOR true, not 1
        (enc({1: -35}) + b"\x00", "trailing"),
    ],
)
def test_protected_header_must_be_exactly_es384(
    genuine: bytes, protected: bytes, match: str
) -> None:
    with pytest.raises(MalformedDocument, match=match):
        at_own_time(rebuild(genuine, protected=protected), genuine)


@pytest.mark.parametrize(
    "spelling",
    [
        b"\xa1\x01\x39\x00\x22",  # non-minimal argument for -35
        b"\xa1\x18\x01\x38\x22",  # non-minimal key 1
        b"\xbf\x01\x38\x22\xff",  # indefinite-length map
    ],
)
def test_protected_header_must_be_canonical(genuine: bytes, spelling: bytes) -> None:
    # These decode to {1: -35} too but are other signed bytes: one spelling only, refused before
    # the signature is even looked at.
    assert cbor2.loads(spelling) == {1: -35}
    with pytest.raises(MalformedDocument, match="expected the canonical encoding a1013822"):
        at_own_time(rebuild(genuine, protected=spelling), genuine)


def test_every_recorded_document_has_the_canonical_protected_header() -> None:
    for name in ALL_DOCUMENTS:
        assert split(vector(name))[0] == b"\xa1\x01\x38\x22", name


def test_protected_header_must_be_a_byte_string(genuine: bytes) -> None:
    mutated = enc([Raw(enc({1: -35})), {}, split(genuine)[2], split(genuine)[3]])
    with pytest.raises(MalformedDocument, match="protected header: expected a byte string"):
        at_own_time(mutated, genuine)


@pytest.mark.parametrize("unprotected", [{4: b"kid"}, {1: -35}, [], 0])
def test_unprotected_header_must_be_empty(genuine: bytes, unprotected: Any) -> None:
    with pytest.raises(MalformedDocument, match="unprotected header"):
        at_own_time(rebuild(genuine, unprotected=unprotected), genuine)


@pytest.mark.parametrize("signature", [b"", bytes(95), bytes(97), bytes(64)])
def test_signature_must_be_96_bytes(genuine: bytes, signature: bytes) -> None:
    with pytest.raises(MalformedDocument, match="expected 96 bytes"):
        at_own_time(rebuild(genuine, signature=signature), genuine)


def test_signature_must_be_bytes(genuine: bytes) -> None:
    p, _, pl, _ = split(genuine)
    with pytest.raises(MalformedDocument, match="signature"):
        at_own_time(enc([p, {}, pl, "x" * 96]), genuine)


def test_payload_must_be_bytes(genuine: bytes) -> None:
    p, _, _, s = split(genuine)
    with pytest.raises(MalformedDocument, match="payload: expected a byte string"):
        at_own_time(enc([p, {}, None, s]), genuine)


@pytest.mark.parametrize("shape", [[1, 2, 3], [1, 2, 3, 4, 5], {"a": 1}, b"x", "x", 7])
def test_top_level_must_be_a_four_element_array(genuine: bytes, shape: Any) -> None:
    with pytest.raises(MalformedDocument, match="COSE_Sign1"):
        at_own_time(enc(shape), genuine)


def test_trailing_bytes_rejected(genuine: bytes) -> None:
    with pytest.raises(MalformedDocument, match="1 trailing bytes"):
        at_own_time(genuine + b"\x00", genuine)


def test_oversize_document_rejected_before_decoding(genuine: bytes) -> None:
    oversize = genuine + bytes(MAX_DOCUMENT_SIZE + 1 - len(genuine))
    with pytest.raises(MalformedDocument, match="too large"):
        at_own_time(oversize, genuine)


def test_non_bytes_document_rejected() -> None:
    with pytest.raises(MalformedDocument):
        verify_document(bytearray(b"\x84"), now=datetime.now(UTC))  # type: ignore[arg-type]


# -- payload mutations -----------------------------------------------------------------------

PAYLOAD_MALFORMED = [
    ("module_id", 123, "module_id"),
    ("module_id", "", "module_id"),
    ("module_id", None, "module_id is null"),
    ("digest", "SHA256", "digest"),
    ("digest", b"SHA384", "digest"),
    ("timestamp", "1725719859545", "timestamp"),
    ("timestamp", -1, "timestamp"),
    ("timestamp", 0, "timestamp"),
    ("timestamp", True, "timestamp"),
    ("timestamp", None, "timestamp is null"),
    ("pcrs", {}, "pcrs"),
    ("pcrs", [bytes(48)], "pcrs"),
    ("pcrs", {0: bytes(47)}, "PCR0: expected 48 bytes, got 47"),
    ("pcrs", {32: bytes(48)}, "index 0..31"),
    ("pcrs", {-1: bytes(48)}, "index 0..31"),
    ("pcrs", {"0": bytes(48)}, "index 0..31"),
    ("pcrs", {0: "00" * 48}, "PCR0: expected 48 bytes, got str"),
    ("pcrs", {i: bytes(48) for i in range(33)}, "pcrs"),
    ("certificate", b"", "certificate"),
    ("certificate", bytes(1025), "certificate"),
    ("certificate", b"\x30\x03\x02\x01\x01", "not a valid DER X.509 certificate"),
    ("certificate", "pem", "certificate"),
    ("cabundle", None, "cabundle is null"),
    ("cabundle", [], "cabundle"),
    ("cabundle", b"\x30", "cabundle"),
    ("cabundle", ["x"], r"cabundle\[0\]"),
    ("cabundle", [b""], r"cabundle\[0\]"),
    ("cabundle", [b"\x30\x00"], r"cabundle\[0\]: not a valid DER"),
    ("public_key", b"", "public_key"),
    ("public_key", bytes(1025), "public_key: expected 1..1024 bytes, got 1025"),
    ("user_data", bytes(1025), "user_data"),
    ("user_data", 5, "user_data: expected a byte string"),
    ("nonce", "abc", "nonce: expected a byte string"),
    ("nonce", bytes(2000), "nonce"),
]


@pytest.mark.parametrize(("field", "value", "match"), PAYLOAD_MALFORMED)
def test_payload_field_malformed(genuine: bytes, field: str, value: Any, match: str) -> None:
    with pytest.raises(MalformedDocument, match=match):
        at_own_time(with_field(genuine, field, value), genuine)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("module_id", lambda v: v[:-1] + "X"),
        ("timestamp", lambda v: v + 1),
        ("pcrs", lambda v: {**v, 3: b"\x01" * 48}),
        ("public_key", lambda v: v[:-1] + b"\x00"),
        ("user_data", lambda v: None),
        ("nonce", lambda v: b""),
    ],
)
def test_payload_value_change_breaks_signature(genuine: bytes, field: str, change: Any) -> None:
    original = dict(payload_items(genuine))
    mutated = with_field(genuine, field, change(original[field]))
    assert mutated != genuine
    with pytest.raises(SignatureInvalid):
        at_own_time(mutated, genuine)


def test_missing_required_field(genuine: bytes) -> None:
    items = [(k, v) for k, v in payload_items(genuine) if k != "pcrs"]
    with pytest.raises(MalformedDocument, match="pcrs is missing"):
        at_own_time(rebuild(genuine, items=items), genuine)


def test_missing_optional_field_is_null(genuine: bytes) -> None:
    from vrpc.attestation._document import _parse_payload

    items = [(k, v) for k, v in payload_items(genuine) if k != "nonce"]
    assert _parse_payload(enc_map(items)).nonce is None


def test_unknown_payload_key_rejected(genuine: bytes) -> None:
    items = [*payload_items(genuine), ("extra", 1)]
    with pytest.raises(MalformedDocument, match="unexpected keys"):
        at_own_time(rebuild(genuine, items=items), genuine)


def test_duplicate_payload_key_rejected(genuine: bytes) -> None:
    items = payload_items(genuine)
    items.append(("nonce", b"attacker"))
    with pytest.raises(MalformedDocument, match="not well-formed CBOR"):
        at_own_time(rebuild(genuine, items=items), genuine)


def test_duplicate_pcr_index_rejected(genuine: bytes) -> None:
    items = [
        (k, Raw(enc_map([(0, bytes(48)), (0, bytes(48))])) if k == "pcrs" else v)
        for k, v in payload_items(genuine)
    ]
    with pytest.raises(MalformedDocument, match="not well-formed CBOR"):
        at_own_time(rebuild(genuine, items=items), genuine)


def test_payload_not_a_map(genuine: bytes) -> None:
    with pytest.raises(MalformedDocument, match="payload: expected a map"):
        at_own_time(rebuild(genuine, payload=enc([1, 2])), genuine)


def test_payload_trailing_bytes(genuine: bytes) -> None:
    with pytest.raises(MalformedDocument, match="payload has 1 trailing"):
        at_own_time(rebuild(genuine, payload=split(genuine)[2] + b"\xf6"), genuine)


# -- chain mutations -----------------------------------------------------------------------


def test_dropping_an_intermediate_breaks_the_chain(genuine: bytes) -> None:
    bundle = dict(payload_items(genuine))["cabundle"]
    mutated = with_field(genuine, "cabundle", [bundle[0], bundle[1], bundle[3]])
    with pytest.raises(ChainInvalid) as info:
        at_own_time(mutated, genuine)
    assert not isinstance(info.value, CertificateExpired)
    assert AWS_NITRO_ROOT_FINGERPRINT in str(info.value)


def test_leaf_replaced_by_an_intermediate(genuine: bytes) -> None:
    bundle = dict(payload_items(genuine))["cabundle"]
    mutated = with_field(genuine, "certificate", bundle[3])
    with pytest.raises(AttestationError):
        at_own_time(mutated, genuine)


def test_time_before_the_leaf_is_expired(genuine: bytes) -> None:
    with pytest.raises(CertificateExpired):
        verify_document(genuine, now=document_time(genuine) - timedelta(hours=1))
