from __future__ import annotations

from pathlib import Path

import pytest

from services.keyvault.impl import KeyVaultImpl

VECTORS = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors"


def vectors_dir(sub: str) -> Path:
    path = VECTORS / sub
    if not path.is_dir():
        pytest.skip(f"test vectors not found: {path}")
    return path


@pytest.fixture
def vault() -> KeyVaultImpl:
    return KeyVaultImpl()
