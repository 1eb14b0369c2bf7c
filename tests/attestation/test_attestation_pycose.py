"""pycose as an independent second implementation of the COSE_Sign1 signature check.

pycose 1.1 cannot decode with cbor2 6 (TimothyClaeys/pycose#141) nor untagged input, so the message
is built with ``Sign1Message.from_cose_obj(list(array), True)``; the key is an EC2Key (P-384 x/y)
taken from the document's leaf certificate. pycose is a cross-check only, never a production path.
"""

from __future__ import annotations

import cbor2
import pytest
from attestation_helpers import ALL_DOCUMENTS, BAD_SIGNATURE, document_time, vector
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from vrpc.attestation import InsecureTestAttester, verify_document
from vrpc.attestation._document import _verify_signature
from vrpc.exceptions import SignatureInvalid

pycose_messages = pytest.importorskip("pycose.messages")
pycose_keys = pytest.importorskip("pycose.keys")
pycose_curves = pytest.importorskip("pycose.keys.curves")


def leaf_key(array: list[object]) -> ec.EllipticCurvePublicKey:
    payload = cbor2.loads(array[2])  # type: ignore[arg-type]
    key = x509.load_der_x509_certificate(payload["certificate"]).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def pycose_verdict(document: bytes) -> bool:
    array = list(cbor2.loads(document))
    numbers = leaf_key(array).public_numbers()
    # from_cose_obj consumes the list it is given.
    message = pycose_messages.Sign1Message.from_cose_obj(array, True)
    message.key = pycose_keys.EC2Key(
        crv=pycose_curves.P384,
        x=numbers.x.to_bytes(48, "big"),
        y=numbers.y.to_bytes(48, "big"),
    )
    return bool(message.verify_signature())


def vrpc_verdict(document: bytes) -> bool:
    protected, _, payload, signature = cbor2.loads(document)
    try:
        _verify_signature(leaf_key([protected, None, payload]), protected, payload, signature)
    except SignatureInvalid:
        return False
    return True


@pytest.mark.parametrize("name", ALL_DOCUMENTS)
def test_pycose_agrees_on_every_vector(name: str) -> None:
    document = vector(name)
    expected = name != BAD_SIGNATURE
    assert pycose_verdict(document) is expected
    assert vrpc_verdict(document) is expected


@pytest.mark.parametrize("name", [n for n in ALL_DOCUMENTS if "NOT_NITRO" not in n])
def test_full_verifier_agrees_with_pycose(name: str) -> None:
    document = vector(name)
    if pycose_verdict(document):
        verify_document(document, now=document_time(document))
    else:
        with pytest.raises(SignatureInvalid):
            verify_document(document, now=document_time(document))


def test_pycose_agrees_on_test_attester_documents() -> None:
    document = InsecureTestAttester(nsm_path="/nonexistent/nsm").attest(nonce=b"n" * 32)
    assert pycose_verdict(document) and vrpc_verdict(document)
    array = cbor2.loads(document)
    tampered = cbor2.dumps([array[0], {}, array[2][:-2] + b"\x00\xff", array[3]])
    assert not pycose_verdict(tampered) and not vrpc_verdict(tampered)
