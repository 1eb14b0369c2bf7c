from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.keyvault.impl import KeyVaultImpl
from services.keyvault.testing import LocalKms, attested_public_key

VECTORS = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors"


def vectors_dir(sub: str) -> Path:
    path = VECTORS / sub
    if not path.is_dir():
        pytest.skip(f"test vectors not found: {path}")
    return path


@pytest.fixture
def kms_vectors() -> Path:
    return vectors_dir("kms")


@pytest.fixture
def vault() -> KeyVaultImpl:
    return KeyVaultImpl()


@pytest.fixture
def test_attester(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The insecure test attester, and its root trusted (both opt-ins given)."""
    attestation = pytest.importorskip("vrpc.attestation")
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    return attestation.InsecureTestAttester(seed=b"keyvault-tests", nsm_path=str(tmp_path / "nsm"))


@pytest.fixture
async def local_kms(test_attester: Any) -> AsyncIterator[LocalKms]:
    """A local KMS that verifies recipients' documents with vrpc's Verifier (test root)."""
    from vrpc.attestation import Verifier

    verifier = Verifier(test_attester.policy(), test_attester.trust_root())
    async with LocalKms(recipient_check=attested_public_key(verifier)) as kms:
        yield kms
