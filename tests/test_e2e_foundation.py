"""End to end over every local transport: declaring services, typed stubs, argument
validation, error mapping, reflection and health."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

import vrpc
from vrpc.service import MethodKind, describe_service


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Point:
    x: int
    y: int
    label: str | None = None


class Demo(vrpc.Service, name="demo.v1"):
    @vrpc.rpc
    async def echo(self, data: bytes) -> bytes: ...

    @vrpc.rpc
    async def add(self, a: int, b: int = 1) -> int: ...

    @vrpc.rpc
    async def shout(self, text: str, loud: bool) -> str: ...

    @vrpc.rpc
    async def total(self, values: list[int]) -> int: ...

    @vrpc.rpc
    async def lookup(self, table: dict[str, int], key: str) -> int | None: ...

    @vrpc.rpc
    async def describe(self, value: int | str | None) -> str: ...

    @vrpc.rpc
    async def paint(self, color: Color) -> Color: ...

    @vrpc.rpc
    async def move(self, p: Point, dx: int) -> Point: ...

    @vrpc.rpc
    async def fail(self, kind: str) -> None: ...

    @vrpc.rpc(name="renamed")
    async def original(self) -> str: ...

    @vrpc.rpc
    def count(self, n: int) -> AsyncIterator[int]: ...


class DemoImpl(Demo):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def echo(self, data: bytes) -> bytes:
        self.calls.append("echo")
        return data

    async def add(self, a: int, b: int = 1) -> int:
        self.calls.append("add")
        return a + b

    async def shout(self, text: str, loud: bool) -> str:
        self.calls.append("shout")
        return text.upper() if loud else text

    async def total(self, values: list[int]) -> int:
        self.calls.append("total")
        return sum(values)

    async def lookup(self, table: dict[str, int], key: str) -> int | None:
        self.calls.append("lookup")
        return table.get(key)

    async def describe(self, value: int | str | None) -> str:
        self.calls.append("describe")
        return type(value).__name__

    async def paint(self, color: Color) -> Color:
        self.calls.append("paint")
        assert isinstance(color, Color)
        return Color.GREEN if color is Color.RED else Color.RED

    async def move(self, p: Point, dx: int) -> Point:
        self.calls.append("move")
        assert isinstance(p, Point)
        return Point(p.x + dx, p.y, p.label)

    async def fail(self, kind: str) -> None:
        self.calls.append("fail")
        if kind == "rpc":
            raise vrpc.RpcError(vrpc.Status.NOT_FOUND, "no such key", {"key": "k1", "n": 3})
        raise ValueError("secret-internal-detail")

    async def original(self) -> str:
        return "renamed ok"

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i


Serve = Callable[..., Any]


def test_describe_service_reads_the_interface() -> None:
    specs = describe_service(Demo)
    assert specs["echo"].full_name == "demo.v1.echo"
    assert specs["count"].kind is MethodKind.SERVER_STREAM
    assert specs["renamed"].attr == "original"
    # the implementation inherits the name and the declared contract
    assert DemoImpl.service_name == "demo.v1"
    assert describe_service(DemoImpl).keys() == specs.keys()


async def test_typed_stub_round_trips_values(serve: Serve, uri: str) -> None:
    async with serve(uri, [DemoImpl()]) as (_, client):
        demo = client.stub(Demo)
        assert isinstance(demo, Demo)
        assert await demo.echo(b"\x00hi") == b"\x00hi"
        assert await demo.add(2) == 3
        assert await demo.add(2, b=5) == 7
        assert await demo.shout("hey", loud=True) == "HEY"
        assert await demo.total([1, 2, 3]) == 6
        assert await demo.lookup({"a": 1}, "a") == 1
        assert await demo.lookup({"a": 1}, "b") is None
        assert await demo.describe(None) == "NoneType"
        assert await demo.describe("x") == "str"
        assert await demo.paint(Color.RED) is Color.GREEN
        moved = await demo.move(Point(1, 2, "p"), 3)
        assert moved == Point(4, 2, "p")
        assert await demo.original() == "renamed ok"
        assert [i async for i in demo.count(4)] == [0, 1, 2, 3]


BAD_ARGUMENTS = [
    ("echo", ["text, not bytes"], "data"),
    ("echo", [12], "data"),
    ("add", ["1"], "a"),
    ("add", [1.5], "a"),
    ("add", [True], "a"),
    ("shout", ["x", 1], "loud"),
    ("shout", [b"x", True], "text"),
    ("total", [[1, "2"]], "values"),
    ("total", [{"a": 1}], "values"),
    ("lookup", [{"a": "1"}, "a"], "table"),
    ("lookup", [[1], "a"], "table"),
    ("describe", [[1]], "value"),
    ("paint", ["blue"], "color"),
    ("move", [{"x": 1}, 1], "p"),
    ("move", [{"x": 1, "y": "2"}, 1], "p"),
    ("move", [[1, 2], 1], "p"),
]


@pytest.mark.parametrize(("method", "args", "param"), BAD_ARGUMENTS)
async def test_invalid_arguments_never_reach_the_handler(
    serve: Serve, method: str, args: list[Any], param: str
) -> None:
    impl = DemoImpl()
    async with serve("memory://validation", [impl]) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.call(f"demo.v1.{method}", args)
        assert info.value.status is vrpc.Status.INVALID_ARGUMENT
        assert repr(param) in info.value.message
        assert info.value.details == {"parameter": param}
        assert impl.calls == []
        # the connection survives: a follow-up call on it works
        proto = client._proto
        assert await client.call("demo.v1.add", [1, 1]) == 2
        assert client._proto is proto


@pytest.mark.parametrize("args", [[], [1, 2, 3]])
async def test_wrong_argument_count_is_invalid_argument(serve: Serve, args: list[Any]) -> None:
    impl = DemoImpl()
    async with serve("memory://count", [impl]) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.call("demo.v1.add", args)
        assert info.value.status is vrpc.Status.INVALID_ARGUMENT
        assert impl.calls == []


async def test_valid_arguments_of_every_shape_are_accepted(serve: Serve) -> None:
    async with serve("memory://valid", [DemoImpl()]) as (_, client):
        assert await client.call("demo.v1.move", [{"x": 1, "y": 2}, 1]) == {
            "x": 2,
            "y": 2,
            "label": None,
        }
        assert await client.call("demo.v1.paint", ["red"]) == "green"
        assert await client.call("demo.v1.describe", [7]) == "int"


async def test_rpc_error_passes_through(serve: Serve, uri: str) -> None:
    async with serve(uri, [DemoImpl()]) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Demo).fail("rpc")
        assert info.value.status is vrpc.Status.NOT_FOUND
        assert info.value.message == "no such key"
        assert info.value.details == {"key": "k1", "n": 3}


async def test_other_exceptions_become_internal_without_traceback(serve: Serve, uri: str) -> None:
    async with serve(uri, [DemoImpl()]) as (server, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.stub(Demo).fail("boom")
        err = info.value
        assert err.status is vrpc.Status.INTERNAL
        assert err.message == "internal error"
        assert err.details is None
        assert "secret-internal-detail" not in str(err)
        assert "Traceback" not in str(err)
        assert await client.stub(Demo).add(1) == 2
        assert server.metrics.snapshot()["demo.v1.fail"]["statuses"] == {"INTERNAL": 1}


@pytest.mark.parametrize("method", ["demo.v1.nope", "nosuch.v1.echo", "echo", ""])
async def test_unknown_method_is_unimplemented(serve: Serve, method: str) -> None:
    async with serve("memory://unknown", [DemoImpl()]) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await client.call(method, [])
        assert info.value.status is vrpc.Status.UNIMPLEMENTED
        assert await client.call("demo.v1.add", [1]) == 2


async def test_streaming_flag_mismatch_is_rejected(serve: Serve) -> None:
    impl = DemoImpl()
    async with serve("memory://mismatch", [impl]) as (_, client):

        async def items() -> AsyncIterator[bytes]:
            yield b"x"

        with pytest.raises(vrpc.RpcError) as info:
            async for _ in client.stream("demo.v1.echo", [b"x"], request=items()):
                pass
        assert info.value.status is vrpc.Status.INVALID_ARGUMENT
        assert impl.calls == []


async def test_reflection_lists_methods_and_signatures(serve: Serve, uri: str) -> None:
    async with serve(uri, [DemoImpl()]) as (_, client):
        services = await client.call("vrpc.reflection.list_services", [])
        assert {"demo.v1", "vrpc.health", "vrpc.reflection"} <= services.keys()
        methods = {m["name"]: m for m in services["demo.v1"]}
        assert methods["demo.v1.add"]["signature"] == "add(a: int, b: int = 1) -> int"
        assert methods["demo.v1.add"]["kind"] == "unary"
        assert methods["demo.v1.count"]["kind"] == "server_stream"
        assert "demo.v1.renamed" in methods
        assert methods["demo.v1.move"]["signature"] == "move(p: Point, dx: int) -> Point"
        health = {m["name"]: m for m in services["vrpc.health"]}
        assert health["vrpc.health.check"]["idempotent"] is True


async def test_health_check(serve: Serve, uri: str) -> None:
    async with serve(uri, [DemoImpl()]) as (server, client):
        assert await client.call("vrpc.health.check", [""]) == "SERVING"
        assert await client.call("vrpc.health.check", []) == "SERVING"
        assert await client.call("vrpc.health.check", ["demo.v1"]) == "SERVING"
        with pytest.raises(vrpc.RpcError) as info:
            await client.call("vrpc.health.check", ["nosuch.v1"])
        assert info.value.status is vrpc.Status.NOT_FOUND
        server.health.set_status("demo.v1", serving=False)
        assert await client.call("vrpc.health.check", ["demo.v1"]) == "NOT_SERVING"
        assert await client.call("vrpc.health.check", [""]) == "SERVING"


async def test_server_without_builtins(serve: Serve) -> None:
    options = {"reflection": False, "health": False}
    async with serve("memory://bare", [DemoImpl()], options) as (_, client):
        for method in ("vrpc.health.check", "vrpc.reflection.list_services"):
            with pytest.raises(vrpc.RpcError) as info:
                await client.call(method, [])
            assert info.value.status is vrpc.Status.UNIMPLEMENTED


def test_a_method_served_twice_is_refused(attester: vrpc.InsecureTestAttester) -> None:
    with pytest.raises(ValueError, match="served twice"):
        vrpc.Server([DemoImpl(), DemoImpl()], attester=attester)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_uvloop(
    serve: Serve, uri_on: Callable[[str, Path], str], tmp_path: Path, transport: str
) -> None:
    uri = uri_on(transport, tmp_path)

    async def scenario() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with serve(uri, [DemoImpl()]) as (_, client):
            demo = client.stub(Demo)
            assert await demo.move(Point(1, 1), 1) == Point(2, 1)
            assert [i async for i in demo.count(3)] == [0, 1, 2]
            results = await asyncio.gather(*(demo.add(i) for i in range(50)))
            assert results == [i + 1 for i in range(50)]
            with pytest.raises(vrpc.RpcError) as info:
                await client.call("demo.v1.add", ["x"])
            assert info.value.status is vrpc.Status.INVALID_ARGUMENT

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


class Odd(vrpc.Service, name="odd.v1"):
    @vrpc.rpc
    async def weird(self) -> Any: ...


class OddImpl(Odd):
    async def weird(self) -> Any:
        return object()  # msgpack cannot carry it


async def test_unencodable_result_is_internal_and_the_connection_survives(
    serve: Serve, uri: str
) -> None:
    async with serve(uri, [OddImpl(), DemoImpl()]) as (_, client):
        with pytest.raises(vrpc.RpcError) as info:
            await asyncio.wait_for(client.call("odd.v1.weird", []), 5)
        assert info.value.status is vrpc.Status.INTERNAL
        proto = client._proto
        assert await client.stub(Demo).add(1) == 2
        assert client._proto is proto


class _Recorder:
    """A channel that records the calls made through it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, list[Any]]] = []

    async def call(self, method: str, args: list[Any], **_: Any) -> Any:
        self.calls.append((method, args))
        return 1 if method.endswith("add") else self.name


async def test_stubs_of_one_interface_share_a_class_and_call_their_own_channel() -> None:
    from vrpc.stub import make_stub

    one, two = _Recorder("one"), _Recorder("two")
    a, b = make_stub(one, Demo), make_stub(two, Demo)  # type: ignore[arg-type]
    assert type(a) is type(b) and isinstance(a, Demo)  # built once per interface
    assert await a.add(5) == 1 and await b.add(7) == 1
    assert one.calls == [("demo.v1.add", [5, 1])] and two.calls == [("demo.v1.add", [7, 1])]
