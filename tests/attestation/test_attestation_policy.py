"""Policy: pinned PCRs, debug mode, freshness, module id; bindings; the Verifier's order."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
from attestation_helpers import document_time, vector

from vrpc.attestation import Claims, Policy, Verifier, check_bindings
from vrpc.exceptions import (
    BindingMismatch,
    CertificateExpired,
    LocalProtocolError,
    PolicyViolation,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
P0 = hashlib.sha384(b"image").digest()
P1 = hashlib.sha384(b"kernel").digest()
P2 = hashlib.sha384(b"app").digest()


def claims(
    *,
    pcrs: dict[int, bytes] | None = None,
    at: datetime = NOW,
    module_id: str = "i-0123456789abcdef0-enc0123456789abcdef",
    nonce: bytes | None = b"nonce",
    public_key: bytes | None = b"key",
    user_data: bytes | None = None,
) -> Claims:
    return Claims(
        module_id=module_id,
        digest="SHA384",
        timestamp_ms=int(at.timestamp() * 1000),
        pcrs={0: P0, 1: P1, 2: P2} if pcrs is None else pcrs,
        certificate=b"",
        cabundle=(),
        public_key=public_key,
        user_data=user_data,
        nonce=nonce,
    )


def test_matching_pins_pass() -> None:
    Policy(pcrs={0: P0, 1: P1, 2: P2}).check(claims(), now=NOW)


def test_hex_pins_are_converted() -> None:
    policy = Policy.pinned({0: P0.hex(), 2: P2.hex().upper()})
    assert policy.pcrs == {0: P0, 2: P2}
    assert Policy(pcrs={0: P0.hex()}).pcrs == {0: P0}  # type: ignore[dict-item]


@pytest.mark.parametrize("pcrs", [{0: b"short"}, {32: P0}, {0: "zz" * 48}, {-1: P0}, {0: 5}])
def test_bad_pins_rejected(pcrs: dict[int, object]) -> None:
    with pytest.raises(LocalProtocolError):
        Policy(pcrs=pcrs)  # type: ignore[arg-type]


def test_wrong_pcr_message() -> None:
    wrong = bytes.fromhex("9a3c") + bytes(46)
    with pytest.raises(PolicyViolation) as info:
        Policy(pcrs={1: wrong}).check(claims(), now=NOW)
    assert str(info.value) == f"PCR1 mismatch (expected 9a3c…, got {P1[:2].hex()}…)"


def test_debug_document_against_pinned_pcr0_hints_debug_mode() -> None:
    pin = bytes.fromhex("9a3c") + bytes(46)
    debug = claims(pcrs={0: bytes(48), 1: bytes(48), 2: bytes(48)})
    with pytest.raises(PolicyViolation) as info:
        Policy(pcrs={0: pin}).check(debug, now=NOW)
    assert str(info.value) == "PCR0 mismatch (expected 9a3c…, got 0000…; debug-mode enclave?)"


def test_missing_pinned_index() -> None:
    with pytest.raises(PolicyViolation, match="PCR8 is pinned but absent"):
        Policy(pcrs={0: P0, 8: P1}).check(claims(), now=NOW)


def test_debug_refused_by_default_and_allowed_explicitly() -> None:
    debug = claims(pcrs={0: bytes(48), 1: bytes(48), 2: bytes(48)})
    assert debug.debug
    with pytest.raises(PolicyViolation, match="debug-mode enclave refused"):
        Policy().check(debug, now=NOW)
    Policy(allow_debug=True).check(debug, now=NOW)
    Policy(pcrs={0: bytes(48)}, allow_debug=True).check(debug, now=NOW)


def test_missing_pcr0_counts_as_debug() -> None:
    assert claims(pcrs={1: P1}).debug
    with pytest.raises(PolicyViolation, match="debug"):
        Policy().check(claims(pcrs={1: P1}), now=NOW)


@pytest.mark.parametrize("offset", [0, 299, -299, 300, -300])
def test_freshness_within_window(offset: float) -> None:
    Policy().check(claims(at=NOW - timedelta(seconds=offset)), now=NOW)


def test_too_old() -> None:
    with pytest.raises(PolicyViolation, match="too old"):
        Policy().check(claims(at=NOW - timedelta(seconds=301)), now=NOW)


def test_from_the_future() -> None:
    with pytest.raises(PolicyViolation, match="from the future"):
        Policy().check(claims(at=NOW + timedelta(seconds=301)), now=NOW)


def test_custom_max_age() -> None:
    with pytest.raises(PolicyViolation, match="too old"):
        Policy(max_age=10).check(claims(at=NOW - timedelta(seconds=11)), now=NOW)
    with pytest.raises(LocalProtocolError):
        Policy(max_age=-1)
    with pytest.raises(LocalProtocolError):
        Policy(max_age=float("inf"))


def test_module_id_prefix() -> None:
    Policy(module_id_prefix="i-0123456789abcdef0").check(claims(), now=NOW)
    with pytest.raises(PolicyViolation, match="module_id mismatch"):
        Policy(module_id_prefix="i-fffffff").check(claims(), now=NOW)


def test_naive_now_is_an_api_error() -> None:
    with pytest.raises(LocalProtocolError):
        Policy().check(claims(), now=datetime(2026, 1, 1))


def test_require_pins_explains_how_to_build_a_policy() -> None:
    with pytest.raises(PolicyViolation, match=r"vrpc attest policy measurements\.json"):
        Policy().require_pins()
    Policy(pcrs={0: P0}).require_pins()


@pytest.mark.parametrize("indices", [(), (1,), (3,), (4,), (3, 4), (1, 3, 4), (5, 9, 16)])
def test_require_pins_refuses_pins_that_identify_no_image(indices: tuple[int, ...]) -> None:
    policy = Policy(pcrs=dict.fromkeys(indices, P1))
    for prod in (True, False):
        with pytest.raises(PolicyViolation) as info:
            policy.require_pins(prod=prod)
        message = str(info.value)
        assert "PCR3/PCR4 are chosen by the parent instance" in message
        assert "PCR1 is shared by every image built with the same nitro-cli" in message
        assert "pin PCR0, PCR2 or PCR8" in message


@pytest.mark.parametrize("index", [0, 2, 8])
def test_require_pins_accepts_one_image_pcr(index: int) -> None:
    Policy(pcrs={index: P0}).require_pins()
    Policy(pcrs={index: P0, 3: P1, 4: P2}).require_pins(prod=False)


@pytest.mark.parametrize("pins", [{8: bytes(48)}, {0: bytes(48)}, {2: bytes(48), 4: P1}])
def test_require_pins_refuses_all_zero_image_pins(pins: dict[int, bytes]) -> None:
    # PCR8 is all zero for every unsigned image: such a pin alone would accept any of them.
    with pytest.raises(PolicyViolation, match="only all-zero image PCRs"):
        Policy(pcrs=pins).require_pins()


def test_all_zero_pcr8_is_refused_even_with_allow_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRPC_ALLOW_DEBUG_ENCLAVE", "1")
    with pytest.raises(PolicyViolation, match="only all-zero image PCRs"):
        Policy(pcrs={8: bytes(48)}, allow_debug=True).require_pins()
    # Zero PCR0 with allow_debug admits only debug enclaves, so it passes (with the opt-in).
    Policy(pcrs={0: bytes(48)}, allow_debug=True).require_pins()


@pytest.mark.parametrize("value", [None, "0", "true", ""])
def test_allow_debug_in_prod_needs_the_env_opt_in(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("VRPC_ALLOW_DEBUG_ENCLAVE", raising=False)
    else:
        monkeypatch.setenv("VRPC_ALLOW_DEBUG_ENCLAVE", value)
    policy = Policy(pcrs={0: bytes(48), 1: bytes(48), 2: bytes(48)}, allow_debug=True)
    with pytest.raises(PolicyViolation) as info:
        policy.require_pins()
    assert "allow_debug=True refused in prod mode" in str(info.value)
    assert "memory is readable by the parent instance" in str(info.value)
    assert "VRPC_ALLOW_DEBUG_ENCLAVE=1" in str(info.value)
    # Under a test root (prod=False) the root's own two opt-ins already say "not confidential".
    policy.require_pins(prod=False)


def test_allow_debug_opt_in_logs_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRPC_ALLOW_DEBUG_ENCLAVE", "1")
    with structlog.testing.capture_logs() as logs:
        Policy(pcrs={0: bytes(48)}, allow_debug=True).require_pins()
        Policy(pcrs={0: P0}).require_pins()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "DEBUG-MODE ENCLAVES ACCEPTED" in warnings[0]["event"]


# -- measurements and files ----------------------------------------------------------------

MEASUREMENTS = {
    "Measurements": {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": P0.hex(),
        "PCR1": P1.hex(),
        "PCR2": P2.hex(),
    }
}


def test_from_measurements_object_and_path(tmp_path: Path) -> None:
    policy = Policy.from_measurements(MEASUREMENTS)
    assert policy.pcrs == {0: P0, 1: P1, 2: P2}
    assert not policy.allow_debug and policy.max_age == 300.0
    signed = {"Measurements": {**MEASUREMENTS["Measurements"], "PCR8": P0.hex()}}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(signed))
    assert Policy.from_measurements(path).pcrs[8] == P0
    assert Policy.from_measurements(str(path)).pcrs[8] == P0


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"Measurements": {"HashAlgorithm": "Sha256 { ... }", "PCR0": P0.hex()}},
        {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": P0.hex()}},
        {"Measurements": {**MEASUREMENTS["Measurements"], "PCR1": "abcd"}},
        [],
    ],
)
def test_from_measurements_rejects(bad: object) -> None:
    with pytest.raises(PolicyViolation):
        Policy.from_measurements(bad)  # type: ignore[arg-type]


def test_dump_load_round_trip(tmp_path: Path) -> None:
    policy = Policy(pcrs={0: P0, 4: P1}, allow_debug=True, max_age=60, module_id_prefix="i-0")
    path = tmp_path / "policy.json"
    path.write_text(policy.dump())
    assert Policy.load(path) == policy
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps(MEASUREMENTS))
    assert Policy.load(measurements) == Policy.from_measurements(MEASUREMENTS)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "{}",
        json.dumps({"format": "vrpc.attestation.policy/1", "allow_debug": "yes"}),
        json.dumps({"format": "vrpc.attestation.policy/1", "pcrs": {"0": "abcd"}}),
        json.dumps({"format": "vrpc.attestation.policy/1", "module_id_prefix": 5}),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(PolicyViolation):
        Policy.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyViolation, match="cannot read"):
        Policy.load(tmp_path / "absent.json")


# -- bindings --------------------------------------------------------------------------------


def test_bindings_match_and_none_means_unchecked() -> None:
    check_bindings(claims(), nonce=b"nonce", public_key=b"key")
    check_bindings(claims())
    check_bindings(claims(nonce=None))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nonce": b"other"}, "nonce mismatch"),
        ({"public_key": b"kex"}, "public_key mismatch"),
        ({"user_data": b"th1"}, r"user_data mismatch \(expected 3 bytes, got null\)"),
        ({"nonce": b""}, "nonce mismatch"),
    ],
)
def test_binding_mismatch(kwargs: dict[str, bytes], match: str) -> None:
    with pytest.raises(BindingMismatch, match=match):
        check_bindings(claims(), **kwargs)


# -- the Verifier on recorded documents --------------------------------------------------------


def test_verifier_on_recorded_document_at_its_time() -> None:
    document = vector("evervault_beta_valid.cbor")
    at = document_time(document)
    from vrpc.attestation import verify_document

    pcrs = verify_document(document, now=at).pcrs
    verifier = Verifier(Policy(pcrs={i: pcrs[i] for i in (0, 1, 2, 8)}))
    result = verifier.verify(document, now=at)
    assert result.pcrs == pcrs
    with pytest.raises(BindingMismatch):
        verifier.verify(document, now=at, nonce=b"x" * 256)
    with pytest.raises(BindingMismatch, match="public_key"):
        verifier.verify(document, now=at, public_key=b"k")
    with pytest.raises(CertificateExpired):
        verifier.verify(document, now=datetime.now(UTC))


@pytest.mark.parametrize(
    "name",
    [
        "blocky_nitro_attestation_debug.cbor",
        "evervault_beta_debug.cbor",
        "eternis_debug_2024-09-17.cbor",
    ],
)
def test_recorded_debug_documents_need_allow_debug(name: str) -> None:
    document = vector(name)
    at = document_time(document)
    with pytest.raises(PolicyViolation, match="debug"):
        Verifier(Policy()).verify(document, now=at)
    assert Verifier(Policy(allow_debug=True)).verify(document, now=at).debug


def test_eternis_debug_pcr3_and_nonce() -> None:
    document = vector("eternis_debug_2024-09-17.cbor")
    at = document_time(document)
    claims_ = Verifier(Policy(allow_debug=True)).verify(document, now=at, nonce=bytes(19) + b"\x01")
    assert claims_.pcrs[3].hex().startswith("671ca1e3")


def test_recorded_production_document_fails_a_wrong_pin() -> None:
    document = vector("blocky_nitro_attestation.cbor")
    with pytest.raises(PolicyViolation, match="PCR0 mismatch"):
        Verifier(Policy(pcrs={0: P0})).verify(document, now=document_time(document))


def test_pins_and_claims_are_read_only() -> None:
    policy = Policy(pcrs={0: P0})
    with pytest.raises(TypeError):
        policy.pcrs[0] = P1  # type: ignore[index]
    document = vector("evervault_beta_valid.cbor")
    from vrpc.attestation import verify_document

    verified = verify_document(document, now=document_time(document))
    with pytest.raises(TypeError):
        verified.pcrs[0] = P1  # type: ignore[index]
