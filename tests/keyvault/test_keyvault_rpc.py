"""keyvault.v1 over vrpc (Unix socket, test attester): types and errors cross the wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.keyvault import KeyInfo, KeyType, KeyVault
from services.keyvault.impl import KeyVaultImpl
from vrpc.exceptions import RpcError
from vrpc.status import Status


async def test_keyvault_over_vrpc(test_attester: Any, tmp_path: Path) -> None:
    vrpc = pytest.importorskip("vrpc")
    uri = f"unix://{tmp_path}/kv.sock"
    server = vrpc.Server([KeyVaultImpl()], attester=test_attester)
    await server.start(uri)
    try:
        policy, root = test_attester.policy(), test_attester.trust_root()
        async with vrpc.connect(uri, policy=policy, root=root) as client:
            vault = client.stub(KeyVault)
            info = await vault.create_key(KeyType.ECDSA_P256, "wire")
            assert isinstance(info, KeyInfo) and info.key_type is KeyType.ECDSA_P256
            assert await vault.list_keys() == [info]
            signature = await vault.sign(info.key_id, b"m")
            assert await vault.verify(info.key_id, b"m", signature)
            with pytest.raises(RpcError) as err:
                await vault.encrypt(info.key_id, b"m")
            assert err.value.status is Status.FAILED_PRECONDITION
            assert err.value.details["param"] == "key_id"
            with pytest.raises(RpcError) as err:
                await vault.public_key("k_missing")
            assert err.value.status is Status.NOT_FOUND
    finally:
        await server.close(grace=1.0)
