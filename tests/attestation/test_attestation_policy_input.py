"""``vrpc attest policy`` reads describe-enclaves output and makes PCR8-only policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vrpc.attestation import Policy
from vrpc.cli_attest import main

MEASUREMENTS = {
    "HashAlgorithm": "Sha384 { ... }",
    **{f"PCR{i}": f"{i:02x}" * 48 for i in (0, 1, 2, 8)},
}


def policy_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: object, *args: str
) -> Policy:
    source = tmp_path / "in.json"
    source.write_text(json.dumps(data))
    assert main(["policy", str(source), *args]) == 0, capsys.readouterr().err
    out = tmp_path / "policy.json"
    out.write_text(capsys.readouterr().out)
    return Policy.load(out)


def test_describe_enclaves_output_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enclave = {"EnclaveName": "keyvault", "EnclaveCID": 16, "Measurements": MEASUREMENTS}
    policy = policy_from(tmp_path, capsys, [enclave])
    assert sorted(policy.pcrs) == [0, 1, 2, 8]
    assert policy.pcrs[0] == bytes.fromhex("00" * 48)


def test_several_enclaves_are_refused_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.json"
    source.write_text(json.dumps([{"Measurements": MEASUREMENTS}] * 2))
    assert main(["policy", str(source)]) == 1
    assert "lists 2 enclaves" in capsys.readouterr().err


def test_pcr8_only_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = policy_from(tmp_path, capsys, {"Measurements": MEASUREMENTS}, "--only", "8")
    assert dict(policy.pcrs) == {8: bytes.fromhex("08" * 48)}
    unsigned = {k: v for k, v in MEASUREMENTS.items() if k != "PCR8"}
    source = tmp_path / "unsigned.json"
    source.write_text(json.dumps({"Measurements": unsigned}))
    assert main(["policy", str(source), "--only", "8"]) == 1
    assert "no PCR8 (the EIF is not signed)" in capsys.readouterr().err


def test_bad_only_values_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in ("x", "40"):
        with pytest.raises(SystemExit) as info:
            main(["policy", str(tmp_path / "any.json"), "--only", bad])
        assert info.value.code == 2
    assert "PCR indices" in capsys.readouterr().err
