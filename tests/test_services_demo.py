"""``make demo`` (``python -m services.demo``): every step runs and says what it proved; the
package edge (vrpc imports nothing from services/, the wheel ships only vrpc)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from services.demo import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore(monkeypatch: pytest.MonkeyPatch, keep_structlog_config: None) -> None:
    # The demo opts in to test attestation through the environment and quiets structlog.
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")


@pytest.mark.slow
def test_demo_runs_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "INSECURE TEST ATTESTATION" in out
    steps = [
        "enclave server listening",
        "wrong PCR0 policy refused",
        "attested handshake",
        "unauthenticated caller refused",
        "signer may not administer",
        "create ed25519 key, sign, verify",
        "encrypt, decrypt (AES-256-GCM, AD)",
        "seal key store through KMS",
        "restart, unseal through KMS",
        "throughput",
    ]
    checked = [line for line in out.splitlines() if line.startswith("  \u2713 ")]
    assert [any(step in line for line in checked) for step in steps] == [True] * len(steps)
    assert "wrong AD -> " in out
    assert "seal -> UNAUTHENTICATED" in out and "delete_key -> PERMISSION_DENIED" in out
    assert "demo finished: every step above was checked." in out


def test_demo_vsock_outside_a_checkout_explains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.demo.Path.exists", lambda self: False)
    assert main(["--vsock"]) == 1
    assert "--vsock needs a source checkout" in capsys.readouterr().err


def test_demo_needs_both_uris(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["unix:///tmp/x.sock"])
    assert info.value.code == 2
    assert "both LISTEN and CONNECT" in capsys.readouterr().err


def test_vrpc_demo_points_to_the_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    from vrpc.cli import main as cli_main

    assert cli_main(["demo"]) == 2
    assert "python -m services.demo" in capsys.readouterr().err


def test_wheel_ships_only_vrpc() -> None:
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert "vrpc" in packages
    assert [p for p in packages if p.split(".")[0] != "vrpc"] == []


def test_demo_runs_as_a_module_from_the_checkout() -> None:
    # The command `make demo` runs, with the checkout root as the working directory.
    out = subprocess.run(
        [sys.executable, "-m", "services.demo", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "python -m services.demo" in out.stdout and "--vsock" in out.stdout
