"""A call with a wrong argument type; ``mypy --strict`` must reject it."""

from __future__ import annotations

import vrpc

from .typed_host import Store


async def use(client: vrpc.Client) -> None:
    store = client.stub(Store)
    await store.get(42)
