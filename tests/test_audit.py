"""The client's attestation audit trail: recorded over real sessions, re-verified by
``vrpc attest audit``, tampering flagged exactly, size bound, restart, and failing closed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vrpc
from vrpc._verify import handshake_verifier
from vrpc.audit import GENESIS, AuditTrail, verify_trail
from vrpc.cli import main

SEED = "tests"  # the seed of conftest's test attester


class Ping(vrpc.Service, name="ping.v1"):
    @vrpc.rpc
    async def ping(self) -> str: ...


class PingImpl(Ping):
    async def ping(self) -> str:
        return "pong"


def entries(directory: Path) -> list[dict[str, Any]]:
    out = []
    for segment in sorted(directory.glob("audit-*.jsonl")):
        out += [json.loads(line) for line in segment.read_text().splitlines()]
    return out


def audit_cli(directory: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["attest", "audit", str(directory), *extra])
    return code, capsys.readouterr().out


def verdict_lines(out: str) -> dict[int, str]:
    """``{seq: "ok: ..." | "FAILED: ..."}`` from the command's output."""
    result = {}
    for line in out.splitlines():
        if not line.startswith("#"):
            continue  # a log line printed before the command took over the output
        seq, rest = line.split(maxsplit=1)
        status = "FAILED" if "  FAILED: " in rest else "ok"
        assert status == "FAILED" or "  ok: " in rest, line
        result[int(seq.lstrip("#"))] = status
    return result


async def record_sessions(
    server_at: Callable[..., Any],
    attester: vrpc.InsecureTestAttester,
    uri: str,
    trail: AuditTrail,
    sessions: int,
) -> None:
    async with server_at(uri, [PingImpl()]):
        for _ in range(sessions):
            async with vrpc.connect(
                uri, policy=attester.policy(), root=attester.trust_root(), audit=trail
            ) as client:
                assert await client.stub(Ping).ping() == "pong"


async def test_tampering_with_one_document_is_flagged_exactly(
    server_at: Callable[..., Any],
    attester: vrpc.InsecureTestAttester,
    uri_on: Callable[[str, Path], str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep_structlog_config: None,
) -> None:
    uri = uri_on("unix", tmp_path)
    directory = tmp_path / "audit"
    trail = AuditTrail(directory)
    await record_sessions(server_at, attester, uri, trail, 4)

    recorded = entries(directory)
    assert [e["seq"] for e in recorded] == [1, 2, 3, 4]
    assert recorded[0]["prev"] == GENESIS
    assert {e["verdict"] for e in recorded} == {"ok"}
    assert {e["peer"] for e in recorded} == {uri}
    assert len({e["document_sha256"] for e in recorded}) == 4  # one document per session
    for e in recorded:
        assert e["pcrs"]["0"] == attester.pcrs[0].hex()
        assert e["root_insecure"] is True
        assert e["root_sha256"] == attester.trust_root().fingerprint
        assert (directory / "policies" / f"{e['policy_sha256']}.json").read_text() == (
            attester.policy().dump()
        )
    assert abs(recorded[0]["verified_at_unix"] - time.time()) < 60

    code, out = audit_cli(directory, capsys, "--insecure-test-seed", SEED)
    assert code == 0, out
    assert verdict_lines(out) == {1: "ok", 2: "ok", 3: "ok", 4: "ok"}

    victim = directory / "docs" / f"{recorded[2]['document_sha256']}.cbor"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    code, out = audit_cli(directory, capsys, "--insecure-test-seed", SEED)
    assert code == 1
    assert verdict_lines(out) == {1: "ok", 2: "ok", 3: "FAILED", 4: "ok"}
    assert "was altered" in out


async def test_a_refused_session_is_recorded_and_confirmed(
    server_at: Callable[..., Any],
    attester: vrpc.InsecureTestAttester,
    uri_on: Callable[[str, Path], str],
    tmp_path: Path,
) -> None:
    uri = uri_on("unix", tmp_path)
    directory = tmp_path / "audit"
    trail = AuditTrail(directory)
    other_image = vrpc.InsecureTestAttester(seed=SEED.encode(), pcrs={2: b"\x07" * 48})
    async with server_at(uri, [PingImpl()]):
        with pytest.raises(vrpc.AttestationError):
            async with vrpc.connect(
                uri, policy=other_image.policy(), root=attester.trust_root(), audit=trail
            ):
                pass
    (entry,) = entries(directory)
    assert entry["verdict"] == "refused"
    assert entry["error"].startswith("PolicyViolation: PCR2 mismatch")
    assert entry["pcrs"] is None
    (result,) = verify_trail(directory, insecure_root=attester.trust_root())
    assert result.ok and result.detail.startswith("refused, confirmed (PolicyViolation")


def _record(trail: AuditTrail, attester: vrpc.InsecureTestAttester, n: int) -> None:
    verify = handshake_verifier(
        vrpc.Verifier(attester.policy(), attester.trust_root()), audit=trail, peer="vsock://16:5000"
    )
    for i in range(n):
        nonce, key, data = os.urandom(32), os.urandom(44), i.to_bytes(4, "big") * 8
        document = attester.attest(nonce=nonce, public_key=key, user_data=data)
        verify(document, nonce=nonce, public_key=key, user_data=data, now=time.time())


def test_an_altered_or_removed_entry_breaks_the_chain(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 4)
    segment = directory / "audit-000001.jsonl"
    lines = segment.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["peer"] = "vsock://99:5000"
    altered = [lines[0], json.dumps(edited, separators=(",", ":"), sort_keys=True), *lines[2:]]
    segment.write_text("\n".join(altered) + "\n")
    assert [r.ok for r in verify_trail(directory, insecure_root=attester.trust_root())] == [
        True,
        True,
        False,
        True,
    ]
    segment.write_text("\n".join([lines[0], lines[2], lines[3]]) + "\n")
    results = verify_trail(directory, insecure_root=attester.trust_root())
    assert [r.ok for r in results] == [True, False, True]
    assert "chain is broken" in results[1].detail


def test_a_recorded_binding_that_does_not_match_fails(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 1)
    segment = directory / "audit-000001.jsonl"
    (entry,) = entries(directory)
    entry["nonce"] = "00" * 32
    segment.write_text(json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n")
    (result,) = verify_trail(directory, insecure_root=attester.trust_root())
    assert not result.ok and "BindingMismatch: nonce mismatch" in result.detail


def test_test_root_entries_need_the_insecure_opt_in(
    attester: vrpc.InsecureTestAttester,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep_structlog_config: None,
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 2)
    code, out = audit_cli(directory, capsys)
    assert code == 1
    assert verdict_lines(out) == {1: "FAILED", 2: "FAILED"}
    assert "INSECURE test root" in out
    # Another test root is not the recorded one.
    code, out = audit_cli(directory, capsys, "--insecure-test-seed", "another seed")
    assert code == 1 and "not the given root" in out


def test_the_insecure_root_option_needs_the_environment_variable(
    attester: vrpc.InsecureTestAttester,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    keep_structlog_config: None,
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 1)
    monkeypatch.delenv("VRPC_INSECURE_TEST_ATTESTATION")
    assert main(["attest", "audit", str(directory), "--insecure-test-seed", SEED]) == 1
    assert "VRPC_INSECURE_TEST_ATTESTATION=1" in capsys.readouterr().err


def test_an_empty_or_missing_trail_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keep_structlog_config: None
) -> None:
    AuditTrail(tmp_path / "empty")
    assert main(["attest", "audit", str(tmp_path / "empty")]) == 1
    assert "no audit entries" in capsys.readouterr().err
    assert main(["attest", "audit", str(tmp_path / "nowhere")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_rotation_bounds_the_disk_and_the_rest_still_verifies(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    bound = 64 * 1024
    trail = AuditTrail(directory, max_segment_bytes=bound, max_segments=2, fsync=False)
    _record(trail, attester, 40)
    segments = sorted(directory.glob("audit-*.jsonl"))
    assert [p.name for p in segments][-1] != "audit-000001.jsonl"  # it rotated
    assert len(segments) == 2
    kept = entries(directory)
    assert [e["seq"] for e in kept] == list(range(41 - len(kept), 41))
    docs = {p.stem for p in (directory / "docs").iterdir()}
    assert docs == {e["document_sha256"] for e in kept}  # rotated-out documents are gone
    used = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert used <= 2 * bound + 4096  # two segments, plus the one policy file
    results = verify_trail(directory, insecure_root=attester.trust_root())
    assert len(results) == len(kept) and all(r.ok for r in results)


def test_a_restarted_trail_continues_the_chain(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 2)
    _record(AuditTrail(directory, fsync=False), attester, 2)
    assert [e["seq"] for e in entries(directory)] == [1, 2, 3, 4]
    results = verify_trail(directory, insecure_root=attester.trust_root())
    assert [r.ok for r in results] == [True] * 4


async def test_a_trail_that_cannot_be_written_refuses_the_session(
    server_at: Callable[..., Any],
    attester: vrpc.InsecureTestAttester,
    uri_on: Callable[[str, Path], str],
    tmp_path: Path,
) -> None:
    uri = uri_on("unix", tmp_path)
    directory = tmp_path / "audit"
    trail = AuditTrail(directory)
    (directory / "docs").rmdir()
    (directory / "docs").write_text("not a directory")
    async with server_at(uri, [PingImpl()]):
        with pytest.raises(vrpc.HandshakeError):
            async with vrpc.connect(
                uri,
                policy=attester.policy(),
                root=attester.trust_root(),
                audit=trail,
                connect_timeout=0.5,
            ) as client:
                await client.stub(Ping).ping()


def test_plaintext_has_nothing_to_audit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no attestation to audit"):
        vrpc.connect("unix:///x.sock", plaintext=True, audit=AuditTrail(tmp_path))


def test_bounds_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_segment_bytes"):
        AuditTrail(tmp_path, max_segment_bytes=1000)
    with pytest.raises(ValueError, match="max_segments"):
        AuditTrail(tmp_path, max_segments=0)


def test_a_missing_document_or_policy_fails(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 2)
    first, _ = entries(directory)
    (directory / "docs" / f"{first['document_sha256']}.cbor").unlink()
    results = verify_trail(directory, insecure_root=attester.trust_root())
    assert [r.ok for r in results] == [False, True]
    assert "is missing" in results[0].detail
    (directory / "policies" / f"{first['policy_sha256']}.json").write_text("{}")
    results = verify_trail(directory, insecure_root=attester.trust_root())
    assert [r.ok for r in results] == [False, False]
    assert "stored policy" in results[1].detail and "was altered" in results[1].detail


def test_a_torn_last_line_is_flagged_and_the_trail_goes_on(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 2)
    with open(directory / "audit-000001.jsonl", "ab") as f:
        f.write(b'{"format":"vrpc.audit/1","se')  # a crash in the middle of a write
    _record(AuditTrail(directory, fsync=False), attester, 1)
    assert (directory / "audit-000002.jsonl").exists()
    results = verify_trail(directory, insecure_root=attester.trust_root())
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].detail == "unreadable entry"
    assert results[3].seq == 3


def test_an_entry_recorded_as_refused_that_verifies_fails(
    attester: vrpc.InsecureTestAttester, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 1)
    (entry,) = entries(directory)
    entry.update(verdict="refused", error="PolicyViolation: made up")
    segment = directory / "audit-000001.jsonl"
    segment.write_text(json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n")
    (result,) = verify_trail(directory, insecure_root=attester.trust_root())
    assert not result.ok and result.detail == "recorded as refused, but the document verifies"


def test_json_output_is_one_object_per_entry(
    attester: vrpc.InsecureTestAttester,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep_structlog_config: None,
) -> None:
    directory = tmp_path / "audit"
    _record(AuditTrail(directory, fsync=False), attester, 2)
    capsys.readouterr()
    code, out = audit_cli(directory, capsys, "--json", "--insecure-test-seed", SEED)
    assert code == 0
    objects = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(o["seq"], o["status"], o["peer"]) for o in objects] == [
        (1, "ok", "vsock://16:5000"),
        (2, "ok", "vsock://16:5000"),
    ]
