"""`make demo VSOCK=1`: the keyvault demo over real AF_VSOCK inside the lab VM."""

from __future__ import annotations

import pytest

from services.demo import _inner


def test_demo_over_vsock(capsys: pytest.CaptureFixture[str], vsock_port: int) -> None:
    assert _inner(f"vsock://ANY:{vsock_port}", f"vsock://1:{vsock_port}") == 0
    out = capsys.readouterr().out
    for step in (
        "wrong PCR0 policy refused",
        "attested handshake",
        "seal key store",
        "restart, unseal",
        "demo finished",
    ):
        assert step in out
