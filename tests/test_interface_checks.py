"""Interface mistakes are refused when the class is defined (or served), with an error naming
the method and what to change; keyword-only parameters work end to end."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import vrpc
from vrpc.service import describe_service
from vrpc.status import Status

Serve = Callable[..., Any]
URI = "memory://interface-checks"


class Scaler(vrpc.Service, name="scaler.v1"):
    @vrpc.rpc
    async def scale(self, x: int, *, factor: int = 2) -> int: ...

    @vrpc.rpc
    async def need(self, a: int = 1, *, b: int) -> list[int]: ...

    @vrpc.rpc
    async def weigh(self, items: AsyncIterator[int], base: int, *, scale: int = 1) -> int: ...

    @vrpc.rpc
    def repeat(self, word: str, *, times: int) -> AsyncIterator[str]: ...


class ScalerImpl(Scaler):
    async def scale(self, x: int, *, factor: int = 2) -> int:
        return x * factor

    async def need(self, a: int = 1, *, b: int) -> list[int]:
        return [a, b]

    async def weigh(self, items: AsyncIterator[int], base: int, *, scale: int = 1) -> int:
        return base + scale * sum([i async for i in items])

    async def repeat(self, word: str, *, times: int) -> AsyncIterator[str]:
        for _ in range(times):
            yield word


async def _ints(*values: int) -> AsyncIterator[int]:
    for v in values:
        yield v


async def test_keyword_only_parameters_end_to_end(serve: Serve) -> None:
    async with serve(URI, [ScalerImpl()]) as (_, client):
        stub = client.stub(Scaler)
        assert await stub.scale(3) == 6
        assert await stub.scale(3, factor=5) == 15
        assert await stub.need(b=7) == [1, 7]
        assert await stub.need(4, b=7) == [4, 7]
        assert await stub.weigh(_ints(1, 2, 3), 10, scale=2) == 22
        assert [w async for w in stub.repeat("hi", times=3)] == ["hi"] * 3
        # On the wire the arguments stay one positional list in declaration order.
        assert await client.call("scaler.v1.scale", [3, 4]) == 12
        assert await client.call("scaler.v1.scale", [3]) == 6
        with pytest.raises(vrpc.RpcError) as info:
            await client.call("scaler.v1.need", [4])  # b has no default
        assert info.value.status is Status.INVALID_ARGUMENT
        assert "takes 2 arguments, got 1" in info.value.message
        assert info.value.details == {"arguments": [2, 2], "got": 1}
        with pytest.raises(vrpc.RpcError) as info:
            async for _ in client.stream("scaler.v1.scale", [3]):  # a unary method as a stream
                pass
        assert info.value.status is Status.INVALID_ARGUMENT
        assert info.value.details == {"kind": "unary"}
        # Refused calls count in the method's statuses, whatever refused them.
        metrics = await client.call("vrpc.reflection.metrics", [])
        assert metrics["methods"]["scaler.v1.scale"]["statuses"]["INVALID_ARGUMENT"] == 1
        assert metrics["methods"]["scaler.v1.need"]["statuses"]["INVALID_ARGUMENT"] == 1
        listed = await client.call("vrpc.reflection.list_services", [])
        signatures = {m["name"]: m["signature"] for m in listed["scaler.v1"]}
        assert signatures["scaler.v1.scale"] == "scale(x: int, *, factor: int = 2) -> int"


class One(vrpc.Service, name="one.v1"):
    @vrpc.rpc
    async def one(self, x: int) -> int:
        return x


async def test_argument_count_errors_read_well(serve: Serve) -> None:
    async with serve(URI, [ScalerImpl(), One()]) as (_, client):
        with pytest.raises(vrpc.RpcError, match="takes 1 to 2 arguments, got 0"):
            await client.call("scaler.v1.scale", [])
        with pytest.raises(vrpc.RpcError, match="takes 1 argument, got 2"):
            await client.call("one.v1.one", [1, 2])


def _define(body: Callable[[], Any]) -> str:
    with pytest.raises(vrpc.InterfaceError) as info:
        body()
    return str(info.value)


def test_plain_def_override_of_a_unary_method() -> None:
    def define() -> None:
        class Bad(Scaler):
            def scale(self, x: int, *, factor: int = 2) -> int:  # type: ignore[override]
                return x

    message = _define(define)
    assert "Bad.scale" in message
    assert "must be implemented as `async def`" in message


def test_plain_def_declaration_of_a_unary_method() -> None:
    def define() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            def get(self) -> int: ...

    assert "Bad.get: a unary or client-streaming method must be `async def`" in _define(define)


def test_stream_overrides_must_be_async_generators() -> None:
    def sync_generator() -> None:
        class Bad(Scaler):
            def repeat(self, word: str, *, times: int) -> Any:
                yield word

    def coroutine() -> None:
        class Bad(Scaler):
            async def repeat(self, word: str, *, times: int) -> Any:
                return [word]

    for define in (sync_generator, coroutine):
        message = _define(define)
        assert "Bad.repeat" in message
        assert "async generator (`async def` with `yield`)" in message


def test_unary_override_must_not_yield() -> None:
    def define() -> None:
        class Bad(Scaler):
            async def scale(self, x: int, *, factor: int = 2) -> Any:
                yield x

    assert "returns one result: implement it as `async def`" in _define(define)


class Plain:
    pass


@dataclasses.dataclass
class Holder:
    inner: list[Plain]


def test_types_the_codec_cannot_carry() -> None:
    def param() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def put(self, value: Plain) -> None: ...

    def result() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def get(self) -> dict[str, Plain]: ...

    def nested() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def put(self, value: Holder) -> None: ...

    def stream_item() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def put(self, values: AsyncIterator[Plain]) -> None: ...

    assert "Bad.put: parameter 'value' has type Plain, which vrpc cannot carry" in _define(param)
    assert "Bad.get: the result has type dict[str, " in _define(result)
    assert "(it contains Plain)" in _define(nested)
    assert "the items of 'values'" in _define(stream_item)
    assert "dataclass or msgspec.Struct" in _define(param)


def test_signature_mistakes() -> None:
    def var_args() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def f(self, *values: int) -> None: ...

    def var_kwargs() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def f(self, **values: int) -> None: ...

    def positional_only() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def f(self, x: int, /) -> None: ...

    def missing_annotation() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def f(self, x) -> None: ...  # type: ignore[no-untyped-def]

    def missing_return() -> None:
        class Bad(vrpc.Service):
            @vrpc.rpc
            async def f(self, x: int): ...  # type: ignore[no-untyped-def]

    assert "Bad.f: *values and **kwargs cannot be sent" in _define(var_args)
    assert "Bad.f: *values and **kwargs cannot be sent" in _define(var_kwargs)
    assert "positional-only: remove the `/`" in _define(positional_only)
    assert "parameter 'x' needs a type annotation, e.g. `x: int`" in _define(missing_annotation)
    assert "the return type needs an annotation" in _define(missing_return)


def test_forward_references_are_checked_when_served(insecure_env: None) -> None:
    # A hint naming a class defined later in the module cannot be resolved at definition:
    # the class is accepted, and the check happens when it is served.
    class Later(vrpc.Service):
        @vrpc.rpc
        async def get(self) -> NotDefinedYet: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(vrpc.InterfaceError, match=r"Later\.get: cannot resolve type hints"):
        describe_service(Later)


def test_serving_the_interface_is_refused(attester: vrpc.InsecureTestAttester) -> None:
    with pytest.raises(TypeError, match="not the class Scaler, which is an interface"):
        vrpc.Server([Scaler], attester=attester)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"not the class ScalerImpl: pass ScalerImpl\(\)"):
        vrpc.Server([ScalerImpl], attester=attester)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"Scaler\.need has no implementation"):
        vrpc.Server([Scaler()], attester=attester)

    from services.echo import Echo, EchoImpl

    # `raise NotImplementedError` bodies count as unimplemented too.
    with pytest.raises(TypeError, match=r"Echo\.echo has no implementation"):
        vrpc.Server([Echo()], attester=attester)
    vrpc.Server([EchoImpl()], attester=attester)  # the implementation is accepted


class Chores(vrpc.Service, name="chores.v1"):
    @vrpc.rpc
    async def noop(self) -> None:
        pass

    @vrpc.rpc
    async def documented_noop(self) -> None:
        """Nothing to do: the docstring alone is the body."""

    @vrpc.rpc
    async def later(self) -> int:
        """Documented, but not written yet."""
        ...


def test_no_op_bodies_are_implementations_and_ellipsis_is_not(
    attester: vrpc.InsecureTestAttester,
) -> None:
    from vrpc.service import has_implementation

    assert has_implementation(Chores.noop)
    assert has_implementation(Chores.documented_noop)
    assert not has_implementation(Chores.later)
    with pytest.raises(TypeError, match=r"Chores\.later has no implementation"):
        vrpc.Server([Chores()], attester=attester)
