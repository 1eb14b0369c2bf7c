"""Declaring services: the ``Service`` base class and the ``@rpc`` decorator.

``@rpc`` only annotates a function (it returns the very same function); nothing is registered
anywhere at import time. A server is built from an explicit list of service *instances*, and
``describe_service`` reads each class's annotated methods once, at construction.

An interface class (signatures only, importable by a host without enclave-only dependencies)
carries the decorators; the implementation class derives from it and overrides the methods
without repeating the decorator. The declared (interface) signature is the wire contract.

Method kinds follow the annotations:

* ``async def f(self, a: int) -> bytes``                    unary
* ``def f(self, a: int) -> AsyncIterator[T]``               server streaming (implement as an
                                                             ``async def`` generator)
* ``async def f(self, items: AsyncIterator[T]) -> R``       client streaming
* ``def f(self, items: AsyncIterator[T]) -> AsyncIterator[U]``  bidirectional streaming
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import inspect
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, overload

__all__ = [
    "MethodKind",
    "MethodSpec",
    "Param",
    "RpcInfo",
    "Service",
    "describe_service",
    "rpc",
]

F = TypeVar("F", bound=Callable[..., Any])

_RPC_ATTR = "_vrpc_rpc"
_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)


@dataclasses.dataclass(frozen=True, slots=True)
class RpcInfo:
    """What ``@rpc`` records on a function."""

    name: str | None = None
    idempotent: bool = False
    timeout: float | None = None


@overload
def rpc(func: F, /) -> F: ...
@overload
def rpc(
    *, name: str | None = None, idempotent: bool = False, timeout: float | None = None
) -> Callable[[F], F]: ...
def rpc(
    func: F | None = None,
    /,
    *,
    name: str | None = None,
    idempotent: bool = False,
    timeout: float | None = None,
) -> F | Callable[[F], F]:
    """Mark a method of a ``Service`` subclass as callable over vrpc.

    ``idempotent=True`` lets clients retry the call on another connection after an
    UNAVAILABLE failure; ``timeout`` is the default deadline in seconds for callers.
    The function is returned unchanged.
    """

    def mark(f: F) -> F:
        setattr(f, _RPC_ATTR, RpcInfo(name=name, idempotent=idempotent, timeout=timeout))
        return f

    if func is not None:
        return mark(func)
    return mark


class Service:
    """Base class of vrpc services.

    ``class KeyVault(vrpc.Service, name="keyvault.v1")`` sets the wire name; subclasses
    (implementations) inherit it. Without ``name`` the class name is used.
    """

    service_name: ClassVar[str] = ""

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.service_name = name
        elif not cls.service_name:
            cls.service_name = cls.__name__


class MethodKind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI_STREAM = "bidi_stream"

    @property
    def streams_request(self) -> bool:
        return self in (MethodKind.CLIENT_STREAM, MethodKind.BIDI_STREAM)

    @property
    def streams_response(self) -> bool:
        return self in (MethodKind.SERVER_STREAM, MethodKind.BIDI_STREAM)


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    name: str
    annotation: Any
    has_default: bool
    default: Any


@dataclasses.dataclass(frozen=True, slots=True)
class MethodSpec:
    """One RPC method as declared by the interface class."""

    service: str
    name: str
    attr: str
    kind: MethodKind
    params: tuple[Param, ...]
    stream_param: str | None
    request_item_type: Any
    result_type: Any
    idempotent: bool
    timeout: float | None
    signature: str

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"


def _stream_item(annotation: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(annotation)
    if origin in _STREAM_ORIGINS:
        args = typing.get_args(annotation)
        return True, (args[0] if args else Any)
    return False, None


def _declaring_function(cls: type, attr: str) -> Callable[..., Any] | None:
    """The first function along the MRO that carries ``@rpc`` for ``attr``."""
    for klass in cls.__mro__:
        func = klass.__dict__.get(attr)
        if func is not None and hasattr(func, _RPC_ATTR):
            return typing.cast(Callable[..., Any], func)
    return None


def describe_service(cls: type[Service]) -> dict[str, MethodSpec]:
    """Read the ``@rpc`` methods of a service class (interface or implementation)."""
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise TypeError(f"{cls!r} is not a vrpc.Service subclass")
    service = cls.service_name
    methods: dict[str, MethodSpec] = {}
    attrs = {name for klass in cls.__mro__ for name in vars(klass)}
    for attr in sorted(attrs):
        func = _declaring_function(cls, attr)
        if func is None:
            continue
        info: RpcInfo = getattr(func, _RPC_ATTR)
        spec = _describe_function(service, attr, func, info)
        if spec.name in methods:
            raise TypeError(f"{service}: two methods are exposed as {spec.name!r}")
        methods[spec.name] = spec
    return methods


def _describe_function(
    service: str, attr: str, func: Callable[..., Any], info: RpcInfo
) -> MethodSpec:
    where = f"{service}.{attr}"
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:  # NameError for an unresolvable forward reference, and kin
        raise TypeError(f"{where}: cannot resolve type hints: {exc}") from exc
    sig = inspect.signature(func)
    params: list[Param] = []
    stream_param: str | None = None
    request_item: Any = None
    for i, p in enumerate(sig.parameters.values()):
        if i == 0:
            continue  # self
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{where}: *args and **kwargs cannot be sent over vrpc")
        if p.name not in hints:
            raise TypeError(f"{where}: parameter {p.name!r} needs a type annotation")
        annotation = hints[p.name]
        is_stream, item = _stream_item(annotation)
        if is_stream:
            if stream_param is not None:
                raise TypeError(f"{where}: at most one streaming parameter")
            stream_param, request_item = p.name, item
            continue
        params.append(
            Param(
                name=p.name,
                annotation=annotation,
                has_default=p.default is not p.empty,
                default=None if p.default is p.empty else p.default,
            )
        )
    if "return" not in hints:
        raise TypeError(f"{where}: the return type needs an annotation")
    streams_out, out_item = _stream_item(hints["return"])
    if inspect.isasyncgenfunction(func) and not streams_out:
        raise TypeError(f"{where}: an async generator must be annotated -> AsyncIterator[T]")
    if not streams_out and not inspect.iscoroutinefunction(func):
        raise TypeError(f"{where}: a unary or client-streaming method must be `async def`")
    if streams_out:
        kind = MethodKind.BIDI_STREAM if stream_param else MethodKind.SERVER_STREAM
        result = out_item
    else:
        kind = MethodKind.CLIENT_STREAM if stream_param else MethodKind.UNARY
        result = hints["return"]
    return MethodSpec(
        service=service,
        name=info.name or attr,
        attr=attr,
        kind=kind,
        params=tuple(params),
        stream_param=stream_param,
        request_item_type=request_item,
        result_type=result,
        idempotent=info.idempotent,
        timeout=info.timeout,
        signature=_render_signature(attr, sig, hints),
    )


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__
    return repr(tp).replace("typing.", "").replace("collections.abc.", "")


def _render_signature(attr: str, sig: inspect.Signature, hints: dict[str, Any]) -> str:
    parts = []
    for i, p in enumerate(sig.parameters.values()):
        if i == 0:
            continue
        text = f"{p.name}: {_type_name(hints[p.name])}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    return f"{attr}({', '.join(parts)}) -> {_type_name(hints['return'])}"
