"""TLS to KMS through the enclave's forward, with a certificate authority the test controls.

In production the enclave's TCP connection to KMS runs through the parent (forward -> vsock ->
vsock-proxy); only TLS, verified against the system's CAs for ``kms.REGION.amazonaws.com``,
keeps the parent out. Here the local KMS serves TLS with a certificate from a test CA the
enclave's client trusts, and the parent, in the middle, has only CAs of its own.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from keyvault_helpers import kms_client

from services.keyvault import KeyType
from services.keyvault.forward import EnclaveForward, tcp_connector
from services.keyvault.impl import KeyVaultImpl
from services.keyvault.sealing import KmsSealer
from services.keyvault.testing import LocalKms, attested_public_key
from vrpc.exceptions import RpcError
from vrpc.status import Status

KMS_HOST = "kms.eu-west-1.amazonaws.com"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def tls_material(directory: Path, label: str, host: str = KMS_HOST) -> tuple[Path, ssl.SSLContext]:
    """A CA (its certificate file) and a server context with a certificate for ``host``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{label} CA"))
        .issuer_name(_name(f"{label} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = directory / f"{label}-ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    chain = directory / f"{label}-server.pem"
    chain.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(pem)
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(chain)
    return ca_file, server


@pytest.fixture
def verifier(test_attester: Any) -> Any:
    from vrpc.attestation import Verifier

    return Verifier(test_attester.policy(), test_attester.trust_root())


async def test_sealing_over_tls_through_the_forward(
    test_attester: Any, verifier: Any, tmp_path: Path
) -> None:
    ca_file, server_ctx = tls_material(tmp_path, "kms")
    async with LocalKms(
        recipient_check=attested_public_key(verifier), ssl_context=server_ctx
    ) as kms:
        arn = kms.create_key()
        forward = EnclaveForward(tcp_connector("127.0.0.1", kms.port), port=0)
        client = kms_client(
            kms,
            endpoint=f"https://{KMS_HOST}",
            route=forward,
            ssl_context=ssl.create_default_context(cafile=str(ca_file)),
            allow_insecure_http=False,
        )
        vault = KeyVaultImpl(sealer=KmsSealer(client, arn, test_attester))
        key = await vault.create_key(KeyType.ED25519)
        sealed = await vault.seal()
        fresh = KeyVaultImpl(sealer=KmsSealer(client, arn, test_attester))
        assert await fresh.unseal(sealed) == [key]
        assert [c.action for c in kms.calls] == ["GenerateDataKey", "Decrypt"]
        assert all(c.headers["host"] == KMS_HOST for c in kms.calls)
        await forward.aclose()


@pytest.mark.parametrize("impostor", ["own CA", "right CA, wrong host"])
async def test_a_parent_in_the_middle_is_refused(
    test_attester: Any, verifier: Any, tmp_path: Path, impostor: str
) -> None:
    ca_file, _ = tls_material(tmp_path, "kms")
    if impostor == "own CA":
        _, parent_ctx = tls_material(tmp_path, "parent")
    else:
        # A CA the client trusts, but a certificate for another host name.
        ca_file, parent_ctx = tls_material(tmp_path, "kms-other", host="kms.attacker.example")
    async with LocalKms(
        recipient_check=attested_public_key(verifier), ssl_context=parent_ctx
    ) as parent:
        arn = parent.create_key()
        forward = EnclaveForward(tcp_connector("127.0.0.1", parent.port), port=0)
        client = kms_client(
            parent,
            endpoint=f"https://{KMS_HOST}",
            route=forward,
            ssl_context=ssl.create_default_context(cafile=str(ca_file)),
            allow_insecure_http=False,
        )
        vault = KeyVaultImpl(sealer=KmsSealer(client, arn, test_attester))
        await vault.create_key(KeyType.ED25519)
        with pytest.raises(RpcError) as info:
            await vault.seal()
        assert info.value.status is Status.UNAVAILABLE
        assert info.value.details["kms_code"] == "TransportError"
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
        assert parent.calls == []  # no request (and no signed credentials) reached it
        await forward.aclose()
