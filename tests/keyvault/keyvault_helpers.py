"""Helpers shared by the keyvault tests (a uniquely named module, importable by basename)."""

from __future__ import annotations

from typing import Any

from services.keyvault.kms import AwsCredentials, KmsClient, StaticCredentials
from services.keyvault.testing import LocalKms


def kms_client(kms: LocalKms, **overrides: Any) -> KmsClient:
    """A KmsClient pointed at ``kms`` with its credentials; keyword arguments override."""
    creds = AwsCredentials(kms.access_key_id, kms.secret_access_key, kms.session_token)
    args: dict[str, Any] = {
        "endpoint": kms.endpoint,
        "region": kms.region,
        "credentials": StaticCredentials(creds),
        "allow_insecure_http": True,  # LocalKms speaks HTTP on loopback unless given TLS
    }
    args.update(overrides)
    return KmsClient(**args)
