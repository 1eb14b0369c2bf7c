"""``make demo`` in process: every step runs and says what it proved."""

from __future__ import annotations

import pytest

from vrpc.demo import main


@pytest.fixture(autouse=True)
def _restore(monkeypatch: pytest.MonkeyPatch, keep_structlog_config: None) -> None:
    # The demo opts in to test attestation through the environment and quiets structlog.
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")


@pytest.mark.slow
def test_demo_runs_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main() == 0
    out = capsys.readouterr().out
    assert "INSECURE TEST ATTESTATION" in out
    steps = [
        "enclave server listening",
        "wrong PCR0 policy refused",
        "attested handshake",
        "create ed25519 key, sign, verify",
        "encrypt, decrypt (AES-256-GCM, AD)",
        "seal key store through KMS",
        "restart, unseal through KMS",
        "throughput",
    ]
    checked = [line for line in out.splitlines() if line.startswith("  \u2713 ")]
    assert [any(step in line for line in checked) for step in steps] == [True] * len(steps)
    assert "wrong AD -> " in out
    assert "demo finished: every step above was checked." in out


def test_demo_vsock_outside_a_checkout_explains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vrpc.demo.Path.exists", lambda self: False)
    assert main(vsock=True) == 1
    assert "--vsock needs a source checkout" in capsys.readouterr().err
