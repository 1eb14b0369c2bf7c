"""A host module using typed stubs; ``mypy --strict`` must accept it.

Interface bodies raise NotImplementedError: mypy --strict reports a bare ``...`` body of a
method with a return type as ``empty-body``."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import reveal_type

import vrpc


@dataclasses.dataclass
class Item:
    name: str
    size: int


class Store(vrpc.Service, name="store.v1"):
    @vrpc.rpc
    async def get(self, name: str) -> Item:
        raise NotImplementedError

    @vrpc.rpc(idempotent=True, timeout=2.0)
    async def put(self, item: Item, overwrite: bool = False) -> bool:
        raise NotImplementedError

    @vrpc.rpc
    def scan(self, prefix: str) -> AsyncIterator[Item]:
        raise NotImplementedError

    @vrpc.rpc
    async def upload(self, chunks: AsyncIterator[bytes]) -> int:
        raise NotImplementedError


async def use(client: vrpc.Client) -> None:
    store = client.stub(Store)
    reveal_type(store)
    item = await store.get("a")
    reveal_type(item)
    ok = await store.put(item, overwrite=True)
    reveal_type(ok)
    async for found in store.scan("a"):
        reveal_type(found)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    total = await store.upload(chunks())
    reveal_type(total)
    with vrpc.call_options(timeout=1.0) as options:
        await store.get("b")
    reveal_type(options.headers)
