"""A call whose shape does not match the method's kind (unary vs streaming) is refused with a
clear INVALID_ARGUMENT before the handler runs, and the connection keeps serving."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import vrpc
from services.echo import Echo, EchoImpl


async def test_unary_call_to_a_streaming_method_is_refused(
    attester: vrpc.InsecureTestAttester, new_uri: Callable[[], str]
) -> None:
    uri = new_uri()
    server = vrpc.Server([EchoImpl()], attester=attester)
    await server.start(uri)
    try:
        async with vrpc.connect(uri, policy=attester.policy(), root=attester.trust_root()) as c:
            with pytest.raises(vrpc.RpcError) as info:
                await c.call("echo.v1.stream", [8, 2])
            assert info.value.status is vrpc.Status.INVALID_ARGUMENT
            assert "server_stream" in info.value.message
            with pytest.raises(vrpc.RpcError) as info:
                [item async for item in c.stream("echo.v1.echo", [b"x"])]
            assert info.value.status is vrpc.Status.INVALID_ARGUMENT
            assert await c.stub(Echo).echo(b"still serving") == b"still serving"
            assert [i async for i in c.stub(Echo).stream(3, 2)] == [b"\x5a" * 3] * 2
    finally:
        await server.close(grace=0)
