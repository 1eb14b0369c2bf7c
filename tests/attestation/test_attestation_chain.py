"""The leaf certificate's own rules (not a CA, covers the document's timestamp) and the cache of
validated chains: what it skips, and what it must never serve."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from attestation_helpers import document_time, payload_items, rebuild, split, vector, with_field
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from vrpc.attestation import InsecureTestAttester, TrustRoot, Verifier, verify_document
from vrpc.attestation import _document as document_module
from vrpc.exceptions import BindingMismatch, CertificateExpired, ChainInvalid, SignatureInvalid

NO_NSM = "/nonexistent/dev/nsm"
FAR = datetime(2099, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _opt_in_and_empty_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    document_module.clear_chain_cache()
    yield
    document_module.clear_chain_cache()


@pytest.fixture
def attester() -> InsecureTestAttester:
    return InsecureTestAttester(seed=b"chain tests", nsm_path=NO_NSM)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Each time the chain is actually validated (not served from the cache), its ``now``."""
    calls: list[datetime] = []
    real = document_module._validate_chain

    def counting(claims: Any, now: datetime, root: TrustRoot) -> Any:
        calls.append(now)
        return real(claims, now, root)

    monkeypatch.setattr(document_module, "_validate_chain", counting)
    return calls


def install_leaf(
    attester: InsecureTestAttester,
    *,
    not_before: datetime,
    not_after: datetime,
    ca: bool = False,
    cert_sign: bool = False,
) -> None:
    """Make ``attester`` sign its next documents with a leaf of our choosing (same issuer)."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted leaf")]))
        .issuer_name(attester._issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .sign(attester._mid_keys[1], hashes.SHA384())
    )
    # The third element is when the attester would renew the leaf: never, for these tests.
    attester._leaf = (key, cert.public_bytes(Encoding.DER), FAR)


# -- the leaf's own rules ------------------------------------------------------------------------


def test_a_ca_leaf_is_refused(attester: InsecureTestAttester) -> None:
    now = datetime.now(UTC)
    install_leaf(attester, not_before=now - timedelta(hours=1), not_after=now + timedelta(hours=1))
    verify_document(attester.attest(), now=now, root=attester.trust_root())  # the control
    install_leaf(
        attester, not_before=now - timedelta(hours=1), not_after=now + timedelta(hours=1), ca=True
    )
    with pytest.raises(ChainInvalid, match=r"the leaf certificate is a CA \(basicConstraints"):
        verify_document(attester.attest(), now=now, root=attester.trust_root())


def test_a_leaf_that_may_sign_certificates_is_refused(attester: InsecureTestAttester) -> None:
    now = datetime.now(UTC)
    install_leaf(
        attester,
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(hours=1),
        cert_sign=True,
    )
    with pytest.raises(ChainInvalid, match="keyCertSign"):
        verify_document(attester.attest(), now=now, root=attester.trust_root())


def test_an_intermediate_used_as_the_leaf_is_refused_as_a_ca() -> None:
    genuine = vector("blocky_nitro_attestation.cbor")
    bundle = dict(payload_items(genuine))["cabundle"]
    mutated = with_field(genuine, "certificate", bundle[3])
    with pytest.raises(ChainInvalid, match="the leaf certificate is a CA"):
        verify_document(mutated, now=document_time(genuine))


def test_document_timestamped_before_its_leaf_is_refused(
    attester: InsecureTestAttester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A genuinely signed document whose timestamp precedes its leaf's notBefore; verified at a
    # time when the whole chain is valid, so only the timestamp rule can refuse it.
    now = datetime.now(UTC)
    install_leaf(attester, not_before=now, not_after=now + timedelta(hours=3))
    earlier_ns = int((now - timedelta(minutes=10)).timestamp() * 1e9)
    monkeypatch.setattr("vrpc.attestation._insecure.time.time_ns", lambda: earlier_ns)
    document = attester.attest()
    assert document_time(document) < now
    with pytest.raises(CertificateExpired, match="outside its leaf certificate's validity"):
        verify_document(document, now=now + timedelta(minutes=1), root=attester.trust_root())


def test_document_timestamped_after_its_leaf_is_refused(attester: InsecureTestAttester) -> None:
    now = datetime.now(UTC)
    install_leaf(attester, not_before=now - timedelta(hours=3), not_after=now - timedelta(hours=1))
    document = attester.attest()  # timestamped now, an hour after the leaf expired
    with pytest.raises(CertificateExpired, match="outside its leaf certificate's validity"):
        verify_document(document, now=now - timedelta(hours=2), root=attester.trust_root())


def test_a_timestamp_beyond_any_date_is_refused_cleanly() -> None:
    genuine = vector("blocky_nitro_attestation.cbor")
    mutated = with_field(genuine, "timestamp", 2**63)
    with pytest.raises(CertificateExpired, match="outside its leaf certificate's validity"):
        verify_document(mutated, now=document_time(genuine))


# -- the chain cache -----------------------------------------------------------------------------


def test_a_cache_hit_skips_chain_validation(
    attester: InsecureTestAttester, builds: list[datetime]
) -> None:
    root = attester.trust_root()
    now = datetime.now(UTC)
    first, second = attester.attest(nonce=b"1"), attester.attest(nonce=b"2")
    assert verify_document(first, now=now, root=root).nonce == b"1"
    assert verify_document(second, now=now + timedelta(seconds=5), root=root).nonce == b"2"
    assert len(builds) == 1  # the same leaf and bundle: validated once


def test_a_tampered_signature_is_refused_with_a_cached_chain(
    attester: InsecureTestAttester, builds: list[datetime]
) -> None:
    root = attester.trust_root()
    now = datetime.now(UTC)
    document = attester.attest()
    verify_document(document, now=now, root=root)
    signature = bytearray(split(document)[3])
    signature[7] ^= 1
    with pytest.raises(SignatureInvalid):
        verify_document(rebuild(document, signature=bytes(signature)), now=now, root=root)
    assert len(builds) == 1  # the chain came from the cache; the signature was still checked


def test_bindings_are_checked_with_a_cached_chain(
    attester: InsecureTestAttester, builds: list[datetime]
) -> None:
    verifier = Verifier(attester.policy(), attester.trust_root())
    now = datetime.now(UTC)
    verifier.verify(attester.attest(nonce=b"mine"), now=now, nonce=b"mine")
    with pytest.raises(BindingMismatch, match="nonce mismatch"):
        verifier.verify(attester.attest(nonce=b"theirs"), now=now, nonce=b"mine")
    assert len(builds) == 1


def test_a_cached_chain_does_not_excuse_the_timestamp(
    attester: InsecureTestAttester, builds: list[datetime], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime.now(UTC)
    install_leaf(attester, not_before=now, not_after=now + timedelta(hours=3))
    root = attester.trust_root()
    verify_document(attester.attest(), now=now + timedelta(minutes=1), root=root)
    earlier_ns = int((now - timedelta(minutes=10)).timestamp() * 1e9)
    monkeypatch.setattr("vrpc.attestation._insecure.time.time_ns", lambda: earlier_ns)
    with pytest.raises(CertificateExpired, match="outside its leaf certificate's validity"):
        verify_document(attester.attest(), now=now + timedelta(minutes=1), root=root)
    assert len(builds) == 1


def test_an_entry_is_not_served_after_the_earliest_not_after(
    attester: InsecureTestAttester, builds: list[datetime]
) -> None:
    root = attester.trust_root()
    document = attester.attest()
    at = document_time(document)
    verify_document(document, now=at, root=root)
    with pytest.raises(CertificateExpired, match="leaf certificate"):
        verify_document(document, now=at + timedelta(hours=4), root=root)
    assert len(builds) == 2


def test_an_entry_is_not_served_before_the_latest_not_before(
    attester: InsecureTestAttester, builds: list[datetime]
) -> None:
    root = attester.trust_root()
    document = attester.attest()
    at = document_time(document)
    verify_document(document, now=at, root=root)
    with pytest.raises(CertificateExpired, match="leaf certificate"):
        verify_document(document, now=at - timedelta(minutes=5), root=root)
    assert len(builds) == 2


def test_an_entry_is_not_served_for_another_root(
    attester: InsecureTestAttester, builds: list[datetime]
) -> None:
    document = attester.attest()
    now = datetime.now(UTC)
    verify_document(document, now=now, root=attester.trust_root())
    other = InsecureTestAttester(seed=b"another root", nsm_path=NO_NSM).trust_root()
    with pytest.raises(ChainInvalid, match=other.fingerprint):
        verify_document(document, now=now, root=other)
    assert len(builds) == 2


def test_an_entry_is_not_served_for_another_bundle(
    attester: InsecureTestAttester, builds: list[datetime]
) -> None:
    # Same leaf, one intermediate swapped for a stranger's: must be validated (and refused),
    # not matched on the leaf alone.
    document = attester.attest()
    now = datetime.now(UTC)
    root = attester.trust_root()
    verify_document(document, now=now, root=root)
    stranger = InsecureTestAttester(seed=b"stranger", nsm_path=NO_NSM)
    bundle = list(dict(payload_items(document))["cabundle"])
    bundle[2] = dict(payload_items(stranger.attest()))["cabundle"][2]
    with pytest.raises(ChainInvalid):
        verify_document(with_field(document, "cabundle", bundle), now=now, root=root)
    assert len(builds) == 2


def test_failures_are_not_cached(attester: InsecureTestAttester, builds: list[datetime]) -> None:
    document = attester.attest()
    at = document_time(document)
    root = attester.trust_root()
    for _ in range(2):
        with pytest.raises(CertificateExpired):
            verify_document(document, now=at + timedelta(hours=4), root=root)
    verify_document(document, now=at, root=root)
    assert len(builds) == 3


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(
    builds: list[datetime], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert document_module.CHAIN_CACHE_SIZE == 64  # the documented bound
    monkeypatch.setattr(document_module, "CHAIN_CACHE_SIZE", 2)
    a, b, c = (InsecureTestAttester(seed=s, nsm_path=NO_NSM) for s in (b"a", b"b", b"c"))
    now = datetime.now(UTC)
    docs = {
        name: (att.attest(), att.trust_root()) for name, att in zip("abc", (a, b, c), strict=True)
    }

    def check(name: str) -> None:
        document, root = docs[name]
        verify_document(document, now=now, root=root)

    for name in "abac":  # c evicts b, the least recently used
        check(name)
    assert len(document_module._chain_cache) == 2
    assert len(builds) == 3
    check("a")
    assert len(builds) == 3  # still cached
    check("b")
    assert len(builds) == 4  # evicted, validated again
