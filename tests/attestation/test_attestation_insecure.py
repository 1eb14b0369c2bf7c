"""The insecure test attester: same verifier path, separate root, two opt-ins, loud logs."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
import structlog
from attestation_helpers import document_time, split, vector
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from vrpc.attestation import (
    AWS_NITRO_ROOT,
    DEFAULT_TEST_PCRS,
    InsecureTestAttester,
    Policy,
    TrustRoot,
    Verifier,
    verify_document,
)
from vrpc.attestation._roots import AWS_NITRO_ROOT_PEM, INSECURE_ROOT_CN, INSECURE_ROOT_ORG
from vrpc.exceptions import (
    BindingMismatch,
    CertificateExpired,
    ChainInvalid,
    NsmError,
    PolicyViolation,
)

NO_NSM = "/nonexistent/dev/nsm"
SEED = b"vrpc tests"


@pytest.fixture(scope="module")
def attester() -> InsecureTestAttester:
    return InsecureTestAttester(seed=SEED, nsm_path=NO_NSM)


@pytest.fixture
def opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")


def test_documents_verify_with_the_same_code_path(
    attester: InsecureTestAttester, opt_in: None
) -> None:
    document = attester.attest(nonce=b"n" * 32, public_key=b"k" * 44, user_data=b"u" * 48)
    verifier = Verifier(attester.policy(), attester.trust_root())
    claims = verifier.verify(
        document,
        now=datetime.now(UTC),
        nonce=b"n" * 32,
        public_key=b"k" * 44,
        user_data=b"u" * 48,
    )
    assert claims.module_id == attester.module_id
    assert dict(claims.pcrs) == dict(DEFAULT_TEST_PCRS)
    assert not claims.debug
    with pytest.raises(BindingMismatch):
        verifier.verify(document, now=datetime.now(UTC), nonce=b"m" * 32)


def test_document_shape_matches_nsm(attester: InsecureTestAttester) -> None:
    document = attester.attest()
    assert document[:6] == bytes.fromhex("8444a1013822")  # untagged, protected {1: -35}
    _, unprotected, payload, signature = split(document)
    assert unprotected == {} and len(signature) == 96
    assert payload[0] == 0xBF and payload[-1] == 0xFF  # indefinite-length map
    fields = cbor2.loads(payload)
    assert list(fields) == [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    ]
    assert fields["public_key"] is None and fields["nonce"] is None
    leaf = x509.load_der_x509_certificate(fields["certificate"])
    oids = {e.oid for e in leaf.extensions}
    assert x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME not in oids
    assert x509.ExtensionOID.AUTHORITY_KEY_IDENTIFIER not in oids
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(hours=3) <= lifetime <= timedelta(hours=3, minutes=2)
    chain = [x509.load_der_x509_certificate(c) for c in fields["cabundle"]]
    assert len(chain) == 3  # root first, then two intermediates
    root = chain[0]
    assert root.public_bytes(Encoding.PEM) == attester.root_pem
    cn = root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    org = root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value
    assert (cn, org) == (INSECURE_ROOT_CN, INSECURE_ROOT_ORG)


def test_production_root_rejects_test_documents(attester: InsecureTestAttester) -> None:
    # The document's cabundle[0] is the test root: a verifier that anchored on it would pass.
    with pytest.raises(ChainInvalid) as info:
        verify_document(attester.attest(), now=datetime.now(UTC))
    assert not isinstance(info.value, CertificateExpired)
    with pytest.raises(ChainInvalid):
        Verifier(attester.policy()).verify(attester.attest(), now=datetime.now(UTC))


def test_env_var_missing_refuses_the_test_root(attester: InsecureTestAttester) -> None:
    with pytest.raises(PolicyViolation, match="VRPC_INSECURE_TEST_ATTESTATION=1"):
        attester.trust_root()


@pytest.mark.parametrize("value", ["0", "true", "yes", ""])
def test_env_var_must_be_exactly_one(
    attester: InsecureTestAttester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", value)
    with pytest.raises(PolicyViolation):
        attester.trust_root()


def test_insecure_test_requires_the_label(opt_in: None) -> None:
    with pytest.raises(PolicyViolation, match="subject must be"):
        TrustRoot.insecure_test(AWS_NITRO_ROOT_PEM)
    with pytest.raises(PolicyViolation, match="not a PEM"):
        TrustRoot.insecure_test(b"garbage")


def test_test_root_cannot_be_a_production_root(attester: InsecureTestAttester) -> None:
    cert = x509.load_pem_x509_certificate(attester.root_pem)
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    with pytest.raises(PolicyViolation, match="only the pinned AWS Nitro root"):
        TrustRoot(certificate=cert, fingerprint=fingerprint, insecure=False)
    with pytest.raises(PolicyViolation, match="fingerprint mismatch"):
        TrustRoot(certificate=cert, fingerprint="00" * 32, insecure=True)
    assert AWS_NITRO_ROOT.insecure is False


def test_direct_insecure_construction_needs_the_env_var(attester: InsecureTestAttester) -> None:
    cert = x509.load_pem_x509_certificate(attester.root_pem)
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    with pytest.raises(PolicyViolation, match="VRPC_INSECURE_TEST_ATTESTATION=1"):
        TrustRoot(certificate=cert, fingerprint=fingerprint, insecure=True)


def test_direct_insecure_construction_needs_the_label(opt_in: None) -> None:
    # A root that looks like AWS's, built with insecure=True directly: the label is still required.
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "aws.nitro-enclaves"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon"),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    with pytest.raises(PolicyViolation, match="test root subject must be CN="):
        TrustRoot(certificate=cert, fingerprint=fingerprint, insecure=True)
    aws = x509.load_pem_x509_certificate(AWS_NITRO_ROOT_PEM)
    with pytest.raises(PolicyViolation, match="test root subject must be CN="):
        TrustRoot(certificate=aws, fingerprint=AWS_NITRO_ROOT.fingerprint, insecure=True)


def test_direct_insecure_construction_with_both_opt_ins(
    attester: InsecureTestAttester, opt_in: None
) -> None:
    cert = x509.load_pem_x509_certificate(attester.root_pem)
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    root = TrustRoot(certificate=cert, fingerprint=fingerprint, insecure=True)
    assert root == attester.trust_root()


def test_refuses_to_run_where_dev_nsm_exists(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.touch()
    with pytest.raises(PolicyViolation, match="exists"):
        InsecureTestAttester(nsm_path=str(device))


def test_warnings_once_per_attester_and_once_per_root(
    opt_in: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vrpc.attestation import _document

    monkeypatch.setattr(_document, "_warned_roots", set())  # as in a fresh process
    now = datetime.now(UTC)
    with structlog.testing.capture_logs() as logs:
        attester = InsecureTestAttester(seed=SEED, nsm_path=NO_NSM)
        verifier = Verifier(attester.policy(), attester.trust_root())
        assert logs == []  # building it (a client learning the root) attests nothing
        document = attester.attest()
        attester.attest()
        verifier.verify(document, now=now)
        verifier.verify(document, now=now)
        Verifier(attester.policy(), attester.trust_root()).verify(document, now=now)
        other = InsecureTestAttester(seed=b"other", nsm_path=NO_NSM)
        Verifier(other.policy(), other.trust_root()).verify(other.attest(), now=now)
    events = [e["event"].split(":")[0] for e in logs if e["log_level"] == "warning"]
    assert events == [
        "INSECURE test attester in use",
        "INSECURE test attestation root in use",
        "INSECURE test attester in use",
        "INSECURE test attestation root in use",
    ]


def test_seed_makes_the_root_deterministic(attester: InsecureTestAttester) -> None:
    again = InsecureTestAttester(seed=SEED, nsm_path=NO_NSM)
    assert again.root_pem == attester.root_pem
    assert again.module_id == attester.module_id
    other = InsecureTestAttester(seed=b"other", nsm_path=NO_NSM)
    assert other.root_pem != attester.root_pem
    unseeded = InsecureTestAttester(nsm_path=NO_NSM)
    assert unseeded.root_pem != InsecureTestAttester(nsm_path=NO_NSM).root_pem


def test_rebuilt_root_verifies_another_instances_documents(
    attester: InsecureTestAttester, opt_in: None
) -> None:
    document = attester.attest(nonce=b"x")
    rebuilt = InsecureTestAttester(seed=SEED, nsm_path=NO_NSM)
    Verifier(rebuilt.policy(), rebuilt.trust_root()).verify(document, now=datetime.now(UTC))


def test_debug_mode_zeroes_pcr0_to_2(opt_in: None) -> None:
    attester = InsecureTestAttester(debug=True, nsm_path=NO_NSM)
    assert attester.policy().allow_debug
    document = attester.attest()
    claims = Verifier(attester.policy(), attester.trust_root()).verify(
        document, now=datetime.now(UTC)
    )
    assert claims.debug
    assert claims.pcrs[3] == DEFAULT_TEST_PCRS[3]
    with pytest.raises(PolicyViolation, match="debug-mode enclave refused"):
        Verifier(Policy(), attester.trust_root()).verify(document, now=datetime.now(UTC))


def test_custom_pcrs(opt_in: None) -> None:
    pcrs = {0: b"\x01" * 48, 1: b"\x02" * 48, 2: b"\x03" * 48}
    attester = InsecureTestAttester(pcrs=pcrs, nsm_path=NO_NSM)
    assert attester.policy().pcrs == pcrs
    claims = Verifier(attester.policy(), attester.trust_root()).verify(
        attester.attest(), now=datetime.now(UTC)
    )
    assert dict(claims.pcrs) == pcrs
    with pytest.raises(ValueError):
        InsecureTestAttester(pcrs={0: b"short"}, nsm_path=NO_NSM)


def test_test_pcrs_never_match_a_real_document(attester: InsecureTestAttester) -> None:
    document = vector("blocky_nitro_attestation.cbor")
    with pytest.raises(PolicyViolation, match="PCR0 mismatch"):
        Verifier(attester.policy()).verify(document, now=document_time(document))


def test_leaf_expires_like_nsm(attester: InsecureTestAttester, opt_in: None) -> None:
    document = attester.attest()
    with pytest.raises(CertificateExpired):
        verify_document(
            document, now=datetime.now(UTC) + timedelta(hours=4), root=attester.trust_root()
        )


def test_oversize_fields_refused_like_nsm(attester: InsecureTestAttester) -> None:
    with pytest.raises(NsmError, match="InvalidArgument"):
        attester.attest(user_data=bytes(1025))


def test_attester_flags() -> None:
    assert InsecureTestAttester.insecure is True
