"""The public surface of vrpc.attestation: complete, sorted, and nothing private leaks."""

from __future__ import annotations

import vrpc.attestation as attestation


def test_all_is_sorted_and_complete() -> None:
    # isort-style order (as ruff's RUF022 keeps it): CONSTANTS, then Classes, then functions.
    def order(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert attestation.__all__ == sorted(attestation.__all__, key=order)
    assert len(set(attestation.__all__)) == len(attestation.__all__)
    public = {
        name
        for name, value in vars(attestation).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("vrpc.attestation")
    }
    assert public <= set(attestation.__all__)
    for name in attestation.__all__:
        assert hasattr(attestation, name)


def test_required_names_exist() -> None:
    required = {
        "AWS_NITRO_ROOT",
        "Attester",
        "Claims",
        "InsecureTestAttester",
        "NsmAttester",
        "NsmDevice",
        "Policy",
        "TrustRoot",
        "Verifier",
        "check_bindings",
        "verify_document",
    }
    assert required <= set(attestation.__all__)


def test_nsm_attester_satisfies_the_protocol() -> None:
    def use(attester: attestation.Attester) -> bool:
        return attester.insecure

    assert use(attestation.NsmAttester.__new__(attestation.NsmAttester)) is False
    assert attestation.InsecureTestAttester.insecure is True
