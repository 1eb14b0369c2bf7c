"""The session's channel binding: equal on both ends of one session, different per session."""

from __future__ import annotations

from typing import Any

import vrpc


class Binding(vrpc.Service, name="binding.v1"):
    @vrpc.rpc
    async def seen(self) -> bytes:
        return vrpc.current_call().peer.channel_binding


async def test_both_ends_see_the_same_binding_and_sessions_differ(
    serve: Any, new_client: Any, uri: str
) -> None:
    async with serve(uri, [Binding()]) as (_, client):
        server_side = await client.stub(Binding).seen()
        assert len(client.channel_binding) == 48
        assert server_side == client.channel_binding
        async with new_client(uri) as other:
            assert other.channel_binding != client.channel_binding
            assert await other.stub(Binding).seen() == other.channel_binding
