"""The KMS key policy for the keyvault key, filled in from a build's measurements.

``deploy/kms-key-policy.json`` is the template. It gives the data-plane calls
(``GenerateDataKey``, ``Decrypt``) to the enclave's role only when the request carries an
attestation document of this build (``kms:RecipientAttestation:ImageSha384`` = PCR0), denies
``Decrypt`` and ``GenerateDataKey*`` to everyone otherwise (which includes every call without a
Recipient, whose plaintext would reach the caller), denies ``Encrypt``, ``ReEncrypt*`` and
``CreateGrant`` to everyone, and has no statement delegating to IAM: an IAM policy granting
``kms:*`` adds nothing. Key administration (including ``PutKeyPolicy``) belongs to a separate key
administrator role, which the parent instance must not be able to assume.

``scripts/build-eif`` runs ``python -m services.keyvault.keypolicy`` after ``nitro-cli
build-enclave``; tests load the same template into the local KMS (``services.keyvault.testing``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TEMPLATE", "PolicyTemplateError", "main", "render_key_policy"]

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "kms-key-policy.json"
_ROLE_ARN = re.compile(
    r"arn:(aws|aws-cn|aws-us-gov):iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}"
)
_SHA384_HEX = re.compile(r"[0-9a-f]{96}")
_PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")


class PolicyTemplateError(ValueError):
    """A template value is missing or malformed, or a placeholder is left unfilled."""


def render_key_policy(
    template: Mapping[str, Any],
    *,
    image_sha384: str,
    enclave_role_arn: str,
    key_admin_role_arn: str,
) -> dict[str, Any]:
    """The template with its placeholders replaced; every value checked first."""
    image = image_sha384.lower()
    if not _SHA384_HEX.fullmatch(image):
        raise PolicyTemplateError("IMAGE_SHA384 must be 96 hex digits (the build's PCR0)")
    if image == "0" * 96:
        raise PolicyTemplateError("IMAGE_SHA384 is all zeros: a debug-mode measurement")
    for name, arn in (("ENCLAVE_ROLE_ARN", enclave_role_arn), ("KEY_ADMIN_ROLE_ARN",
                      key_admin_role_arn)):  # fmt: skip
        if not _ROLE_ARN.fullmatch(arn):
            raise PolicyTemplateError(f"{name} must be an IAM role ARN, got {arn[:120]!r}")
    if enclave_role_arn == key_admin_role_arn:
        raise PolicyTemplateError("the enclave's role must not be the key administrator role")
    values = {
        "IMAGE_SHA384": image,
        "ENCLAVE_ROLE_ARN": enclave_role_arn,
        "KEY_ADMIN_ROLE_ARN": key_admin_role_arn,
    }
    rendered: dict[str, Any] = _fill(dict(template), values)
    return rendered


def _fill(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, str):

        def one(match: re.Match[str]) -> str:
            if match[1] not in values:
                raise PolicyTemplateError(f"the template uses ${{{match[1]}}}, which has no value")
            return values[match[1]]

        return _PLACEHOLDER.sub(one, node)
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, dict):
        return {key: _fill(item, values) for key, item in node.items()}
    return node


def pcr0_from_measurements(data: Mapping[str, Any]) -> str:
    """PCR0 from ``nitro-cli build-enclave`` / ``describe-eif`` output."""
    measurements = data.get("Measurements", data)
    pcr0 = measurements.get("PCR0") if isinstance(measurements, dict) else None
    if not isinstance(pcr0, str):
        raise PolicyTemplateError("no Measurements.PCR0 in the measurements file")
    return pcr0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.keyvault.keypolicy",
        description="fill in the keyvault KMS key policy from a build's measurements",
    )
    parser.add_argument("measurements", help="measurements.json from nitro-cli build-enclave")
    parser.add_argument("--enclave-role", required=True, help="parent instance role ARN")
    parser.add_argument("--key-admin-role", required=True, help="key administrator role ARN")
    parser.add_argument("--template", default=str(TEMPLATE))
    args = parser.parse_args(argv)
    try:
        measurements = json.loads(Path(args.measurements).read_text())
        template = json.loads(Path(args.template).read_text())
        policy = render_key_policy(
            template,
            image_sha384=pcr0_from_measurements(measurements),
            enclave_role_arn=args.enclave_role,
            key_admin_role_arn=args.key_admin_role,
        )
    except (OSError, ValueError) as exc:
        print(f"keypolicy: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(policy, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
