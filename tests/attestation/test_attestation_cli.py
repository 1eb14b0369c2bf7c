"""``vrpc attest verify|inspect|policy``, called in-process and once as a module."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from attestation_helpers import ATTESTATION_VECTORS, vector

from vrpc.attestation import InsecureTestAttester, Policy
from vrpc.cli_attest import add_attest_parser, main

GENUINE = "blocky_nitro_attestation.cbor"


def path_of(name: str) -> str:
    vector(name)  # skips when the vectors are absent
    return str(ATTESTATION_VECTORS / name)


def test_parser_wiring() -> None:
    parser = argparse.ArgumentParser(prog="vrpc")
    add_attest_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["attest", "verify", "doc.cbor", "--pcr", "0=ab", "--allow-debug"])
    assert callable(args.func) and args.pcr == [(0, "ab")] and args.allow_debug
    with pytest.raises(SystemExit):
        parser.parse_args(["attest", "verify", "x", "--at", "2024-01-01", "--at-document-time"])


def test_verify_at_document_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", path_of(GENUINE), "--at-document-time"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("VALID at 2024-09-07T14:37:39.545Z")
    assert "i-0a22e5c5f24d22174-enc0191cceb4289903f" in out


def test_verify_now_fails_expired(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", path_of(GENUINE)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("INVALID: CertificateExpired: leaf certificate")


def test_verify_at_explicit_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", path_of(GENUINE), "--at", "2024-09-07T14:38:00Z"]) == 0
    assert main(["verify", path_of(GENUINE), "--at", "2024-09-07T14:50:00"]) == 1
    assert "too old" in capsys.readouterr().err


def test_verify_pins_and_debug(capsys: pytest.CaptureFixture[str]) -> None:
    debug = path_of("eternis_debug_2024-09-17.cbor")
    assert main(["verify", debug, "--at-document-time"]) == 1
    assert "debug-mode enclave refused" in capsys.readouterr().err
    assert main(["verify", debug, "--at-document-time", "--allow-debug"]) == 0
    capsys.readouterr()
    pin = "9a3c" + "00" * 46
    assert main(["verify", debug, "--at-document-time", "--pcr", f"0={pin}"]) == 1
    assert capsys.readouterr().err.strip() == (
        "INVALID: PolicyViolation: PCR0 mismatch (expected 9a3c…, got 0000…; debug-mode enclave?)"
    )
    assert main(["verify", debug, "--at-document-time", "--pcr", "0=abcd"]) == 1
    assert "expected 48 bytes" in capsys.readouterr().err


def test_verify_bad_signature_json(capsys: pytest.CaptureFixture[str]) -> None:
    bad = path_of("eternis_BAD_sig_2024-07-23.cbor")
    assert main(["verify", bad, "--at-document-time", "--allow-debug", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is False and result["error"] == "SignatureInvalid"


def test_verify_json_success(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", path_of(GENUINE), "--at-document-time", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is True and result["debug"] is False
    assert len(result["pcrs"]["0"]) == 96


def test_verify_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Not a verdict on a document: an input mistake (exit 2), one `vrpc:` line.
    assert main(["verify", str(tmp_path / "absent.cbor")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vrpc: cannot read") and "INVALID" not in err


def test_verify_with_test_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    attester = InsecureTestAttester(seed=b"cli", nsm_path="/nonexistent/nsm")
    document = tmp_path / "doc.cbor"
    document.write_bytes(attester.attest(nonce=b"n"))
    root = tmp_path / "root.pem"
    root.write_bytes(attester.root_pem)
    assert main(["verify", str(document), "--root", str(root)]) == 1
    assert "VRPC_INSECURE_TEST_ATTESTATION=1" in capsys.readouterr().err
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")
    assert main(["verify", str(document), "--root", str(root)]) == 0
    assert "INSECURE test root" in capsys.readouterr().out
    assert main(["verify", str(document)]) == 1  # AWS root by default
    assert "ChainInvalid" in capsys.readouterr().err


def test_inspect(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", path_of("evervault_beta_valid.cbor")]) == 0
    out = capsys.readouterr().out
    assert "NOT VERIFIED" in out
    assert "timestamp    2022-10-13T08:58:02.136Z" in out
    assert "PCR0         f4d48b81" in out
    assert "public_key   null" in out
    assert "CN=aws.nitro-enclaves" in out


def test_inspect_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01")
    assert main(["inspect", str(junk)]) == 1
    assert "MalformedDocument" in capsys.readouterr().err


def test_policy_from_measurements(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    measurements = tmp_path / "measurements.json"
    pcr = {f"PCR{i}": f"{i:02x}" * 48 for i in (0, 1, 2, 8)}
    measurements.write_text(
        json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", **pcr}})
    )
    assert main(["policy", str(measurements), "--max-age", "60"]) == 0
    out = tmp_path / "policy.json"
    out.write_text(capsys.readouterr().out)
    policy = Policy.load(out)
    assert sorted(policy.pcrs) == [0, 1, 2, 8] and policy.max_age == 60
    assert main(["policy", str(tmp_path / "absent.json")]) == 2


def test_module_entry_point() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vrpc",
            "attest",
            "verify",
            path_of(GENUINE),
            "--at-document-time",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("VALID")
