"""Attestation test configuration."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_insecure_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Tests opt in to the insecure root explicitly; never inherit it from the shell.
    monkeypatch.delenv("VRPC_INSECURE_TEST_ATTESTATION", raising=False)
    yield
