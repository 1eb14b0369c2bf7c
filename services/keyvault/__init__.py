"""keyvault.v1: keys created and used inside a Nitro enclave, sealed with AWS KMS.

Importing this package gives the interface only (safe on hosts); the enclave side is
``services.keyvault.impl``.
"""

from services.keyvault.interface import (
    MAX_KEYS,
    MAX_LABEL_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_SEALED_BYTES,
    KeyInfo,
    KeyType,
    KeyVault,
    sealed_generation,
)

__all__ = [
    "MAX_KEYS",
    "MAX_LABEL_CHARS",
    "MAX_MESSAGE_BYTES",
    "MAX_SEALED_BYTES",
    "KeyInfo",
    "KeyType",
    "KeyVault",
    "sealed_generation",
]
