"""The committed KMS key policy template, its renderer, and the local KMS's policy evaluation.

LocalKms evaluates key policies itself (services/keyvault/testing.py says what it models); these
tests pin its semantics to the IAM rules the template relies on, so that the parent-instance
tests (test_keyvault_parent.py) prove something about the template rather than about LocalKms.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.keyvault.keypolicy import (
    TEMPLATE,
    PolicyTemplateError,
    pcr0_from_measurements,
    render_key_policy,
)
from services.keyvault.testing import (
    KmsRequestError,
    Principal,
    check_key_policy,
    evaluate_key_policy,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ab" * 48
ENCLAVE_ROLE = "arn:aws:iam::111122223333:role/vrpc-parent"
ADMIN_ROLE = "arn:aws:iam::111122223333:role/vrpc-key-admin"
KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def rendered(image: str = IMAGE) -> dict[str, Any]:
    template = json.loads(TEMPLATE.read_text())
    return render_key_policy(
        template, image_sha384=image, enclave_role_arn=ENCLAVE_ROLE, key_admin_role_arn=ADMIN_ROLE
    )


def principal(arn: str, iam: tuple[str, ...] = ("kms:*",)) -> Principal:
    return Principal("AKIA", "secret", None, arn.split(":")[4], arn, iam)


def decide(
    who: Principal, action: str, context: dict[str, str] | None = None, key_account: str = ""
) -> str | None:
    return evaluate_key_policy(
        rendered(),
        who=who,
        action=action,
        key_account=key_account or "111122223333",
        context={"aws:PrincipalArn": who.arn, **(context or {})},
    )


ATTESTED = {
    "kms:RecipientAttestation:ImageSha384": IMAGE,
    "kms:EncryptionContext:vrpc:service": "keyvault.v1",
}


def test_template_is_committed_and_renders_completely() -> None:
    assert TEMPLATE == ROOT / "deploy" / "kms-key-policy.json"
    policy = rendered(IMAGE.upper())
    text = json.dumps(policy)
    assert "${" not in text and IMAGE in text and IMAGE.upper() not in text
    check_key_policy(policy)  # only elements LocalKms evaluates exactly
    # No statement delegates to IAM (no account principal, no "kms:*").
    for statement in policy["Statement"]:
        principals = statement["Principal"]
        assert principals == "*" or not principals["AWS"].endswith(":root")
        assert "kms:*" not in statement["Action"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_sha384": "ab" * 47}, "96 hex"),
        ({"image_sha384": "0" * 96}, "debug-mode"),
        ({"enclave_role_arn": "arn:aws:iam::111122223333:root"}, "ENCLAVE_ROLE_ARN"),
        ({"key_admin_role_arn": "vrpc-key-admin"}, "KEY_ADMIN_ROLE_ARN"),
        ({"key_admin_role_arn": ENCLAVE_ROLE}, "must not be the key administrator"),
    ],
)
def test_bad_template_values_are_refused(change: dict[str, str], message: str) -> None:
    args = {
        "image_sha384": IMAGE,
        "enclave_role_arn": ENCLAVE_ROLE,
        "key_admin_role_arn": ADMIN_ROLE,
        **change,
    }
    with pytest.raises(PolicyTemplateError, match=message):
        render_key_policy(json.loads(TEMPLATE.read_text()), **args)


def test_unknown_placeholder_is_refused() -> None:
    with pytest.raises(PolicyTemplateError, match=r"\$\{ACCOUNT_ID\}"):
        render_key_policy(
            {"Id": "${ACCOUNT_ID}"},
            image_sha384=IMAGE,
            enclave_role_arn=ENCLAVE_ROLE,
            key_admin_role_arn=ADMIN_ROLE,
        )


def test_command_line_fills_the_template_from_measurements(tmp_path: Path) -> None:
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps({"Measurements": {"PCR0": IMAGE, "PCR1": "00"}}))
    args = ["--enclave-role", ENCLAVE_ROLE, "--key-admin-role", ADMIN_ROLE]
    out = subprocess.run(
        [sys.executable, "-m", "services.keyvault.keypolicy", str(measurements), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == rendered()
    assert pcr0_from_measurements({"PCR0": IMAGE}) == IMAGE
    with pytest.raises(PolicyTemplateError, match="PCR0"):
        pcr0_from_measurements({"Measurements": {}})


def test_the_enclave_role_gets_data_keys_only_with_this_builds_attestation() -> None:
    enclave = principal(ENCLAVE_ROLE)
    for action in ("GenerateDataKey", "Decrypt"):
        assert decide(enclave, action, ATTESTED) is None
        # No Recipient: the condition key is absent, the negated Deny applies.
        assert "explicit deny" in str(decide(enclave, action, ATTESTED_WITHOUT_IMAGE))
        other_image = {**ATTESTED, "kms:RecipientAttestation:ImageSha384": "cd" * 48}
        assert "DenyPlaintextOutsideTheMeasuredEnclave" in str(decide(enclave, action, other_image))
        # The right image but without the keyvault encryption context: not allowed.
        no_context = {"kms:RecipientAttestation:ImageSha384": IMAGE}
        assert decide(enclave, action, no_context) == "no statement of the key policy allows it"
    # The image digest compares case-insensitively, as the template says.
    upper = {**ATTESTED, "kms:RecipientAttestation:ImageSha384": IMAGE.upper()}
    assert decide(enclave, "Decrypt", upper) is None


ATTESTED_WITHOUT_IMAGE = {"kms:EncryptionContext:vrpc:service": "keyvault.v1"}


@pytest.mark.parametrize("action", ["Encrypt", "ReEncryptFrom", "ReEncryptTo", "CreateGrant"])
def test_wrapping_and_delegation_are_denied_to_everyone(action: str) -> None:
    for arn in (ENCLAVE_ROLE, ADMIN_ROLE, "arn:aws:iam::444455556666:role/attacker"):
        why = decide(principal(arn), action, ATTESTED)
        assert why is not None and "explicit deny" in why


@pytest.mark.parametrize(
    "action",
    [
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
    ],
)
def test_other_data_key_calls_are_denied_without_this_builds_attestation(action: str) -> None:
    enclave = principal(ENCLAVE_ROLE)
    assert "explicit deny" in str(decide(enclave, action, ATTESTED_WITHOUT_IMAGE))
    # With the attestation nothing allows them either.
    assert decide(enclave, action, ATTESTED) == "no statement of the key policy allows it"


def test_iam_permissions_add_nothing() -> None:
    # A role in the key's account whose IAM policy allows kms:* still gets nothing: the template
    # has no statement delegating to IAM.
    other_role = principal("arn:aws:iam::111122223333:role/ops")
    assert decide(other_role, "DescribeKey") == "no statement of the key policy allows it"
    assert decide(other_role, "Decrypt", ATTESTED) == "no statement of the key policy allows it"
    assert decide(principal(ADMIN_ROLE), "PutKeyPolicy") is None
    assert decide(principal(ADMIN_ROLE), "Decrypt", ATTESTED) is not None


def test_evaluator_follows_iam_rules() -> None:
    account_root = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Principal": {"AWS": "444455556666"},
                "Action": "kms:Decrypt",
                "Resource": "*",
            },
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"Null": {"kms:EncryptionContext:app": "true"}},
            },
        ],
    }
    check_key_policy(account_root)

    def run(who: Principal, action: str, context: dict[str, str]) -> str | None:
        return evaluate_key_policy(
            account_root, who=who, action=action, key_account="111122223333", context=context
        )

    app = {"kms:EncryptionContext:app": "x"}
    local = principal("arn:aws:iam::111122223333:role/a")
    assert run(local, "Decrypt", app) is None  # delegated to IAM, IAM allows
    assert run(principal(local.arn, ("kms:Encrypt",)), "Decrypt", app) is not None
    assert "explicit deny" in str(run(local, "Decrypt", {}))  # Null: the key is absent
    foreign = principal("arn:aws:iam::444455556666:role/b")
    assert run(foreign, "Decrypt", app) is None  # cross-account: key policy and IAM allow
    assert run(principal(foreign.arn, ()), "Decrypt", app) is not None  # IAM does not
    assert run(foreign, "Encrypt", app) is not None  # the key policy does not


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ({"NotAction": "kms:Decrypt"}, "not modelled"),
        ({"Condition": {"ArnLike": {"aws:PrincipalArn": "x"}}}, "ArnLike"),
        ({"Condition": {"StringEquals": {"aws:SourceVpce": "x"}}}, "aws:SourceVpce"),
        ({"Resource": "arn:aws:kms:*"}, "Resource"),
        ({"Principal": {"Service": "x"}}, "Principal"),
        ({"Effect": "Maybe"}, "Effect"),
    ],
)
def test_policies_the_local_kms_cannot_evaluate_are_refused(
    statement: dict[str, Any], message: str
) -> None:
    base = {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}
    with pytest.raises(KmsRequestError, match=message) as info:
        check_key_policy({"Version": "2012-10-17", "Statement": [{**base, **statement}]})
    assert info.value.code == "MalformedPolicyDocumentException"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kms-key-id", "alias/vrpc-keyvault"], "must be a full key ARN"),
        ([], "--kms-key-id ARN is required"),
        (
            ["--kms-key-id", KEY_ARN, "--enclave-role", ENCLAVE_ROLE],
            "give both --enclave-role and --key-admin-role",
        ),
    ],
)
def test_build_eif_refuses_a_key_that_is_not_an_arn(args: list[str], message: str) -> None:
    # Argument checks run before docker or nitro-cli is looked for.
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-eif"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and message in out.stderr
