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

import ast
import collections.abc
import dataclasses
import enum
import inspect
import textwrap
import typing
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, overload

__all__ = [
    "InterfaceError",
    "MethodKind",
    "MethodSpec",
    "Param",
    "RpcInfo",
    "Service",
    "describe_service",
    "has_implementation",
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


class InterfaceError(TypeError):
    """A service class that vrpc cannot serve or call as declared (raised at definition)."""


class _UnresolvedHints(InterfaceError):
    """Type hints that name something not defined yet (a forward reference)."""


class Service:
    """Base class of vrpc services.

    ``class KeyVault(vrpc.Service, name="keyvault.v1")`` sets the wire name; subclasses
    (implementations) inherit it. Without ``name`` the class name is used.

    Every ``@rpc`` method is checked when the class is defined: its annotations, that the codec
    can carry its parameter and result types, and that an override has the right shape
    (``async def``, or an async generator for a streaming result). A mistake raises
    ``InterfaceError`` (a ``TypeError``) naming the method and what to change.
    """

    service_name: ClassVar[str] = ""

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.service_name = name
        elif not cls.service_name:
            cls.service_name = cls.__name__
        if vars(cls).get("_vrpc_stub"):
            return  # a generated client stub: its methods return the channel's awaitables
        bases = [b for b in cls.__bases__ if issubclass(b, Service)]
        declares = any(hasattr(v, _RPC_ATTR) for v in vars(cls).values())
        try:
            if not declares and name is None and len(bases) == 1:
                # Only overrides (an implementation, a stub): the declarations are the base's,
                # checked when it was defined.
                specs = describe_service(bases[0])
            else:
                specs = describe_service(cls)
        except _UnresolvedHints:
            # A hint naming a class defined later in the module: resolvable only once the
            # module has loaded, so the check happens when a server or stub reads the class.
            return
        for spec in specs.values():
            _check_implementation(cls, spec)


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
    # Keyword-only parameters (after ``*``) travel in the same positional list, after the
    # others; the server passes them to the handler by name.
    keyword_only: bool = False


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
    # How many of ``params`` come before the streaming parameter in the declaration.
    stream_position: int | None = None

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


_described: weakref.WeakKeyDictionary[type, dict[str, MethodSpec]] = weakref.WeakKeyDictionary()


def describe_service(cls: type[Service]) -> dict[str, MethodSpec]:
    """Read the ``@rpc`` methods of a service class (interface or implementation)."""
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise InterfaceError(f"{cls!r} is not a vrpc.Service subclass")
    # A class's methods are read once (classes are not changed after definition); stubs and
    # servers built from it afterwards reuse the result. Callers get their own dict.
    cached = _described.get(cls)
    if cached is None:
        cached = _described[cls] = _describe(cls)
    return dict(cached)


def _describe(cls: type[Service]) -> dict[str, MethodSpec]:
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
            raise InterfaceError(
                f"{service}: two methods are exposed as {spec.name!r}: rename one with "
                "@rpc(name=...)"
            )
        methods[spec.name] = spec
    return methods


def _describe_function(
    service: str, attr: str, func: Callable[..., Any], info: RpcInfo
) -> MethodSpec:
    where = f"{service}.{attr}"
    try:
        hints = typing.get_type_hints(func)
    except NameError as exc:
        raise _UnresolvedHints(f"{where}: cannot resolve type hints: {exc}") from exc
    except Exception as exc:  # a hint that is not a type expression, and kin
        raise InterfaceError(f"{where}: cannot resolve type hints: {exc}") from exc
    sig = inspect.signature(func)
    params: list[Param] = []
    stream_param: str | None = None
    stream_position: int | None = None
    request_item: Any = None
    for i, p in enumerate(sig.parameters.values()):
        if i == 0:
            continue  # self
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise InterfaceError(
                f"{where}: *{p.name} and **kwargs cannot be sent over vrpc: "
                "declare each argument as a named, annotated parameter"
            )
        if p.kind is p.POSITIONAL_ONLY:
            raise InterfaceError(
                f"{where}: parameter {p.name!r} is positional-only: remove the `/` "
                "(vrpc arguments can be given by name)"
            )
        if p.name not in hints:
            raise InterfaceError(
                f"{where}: parameter {p.name!r} needs a type annotation, e.g. `{p.name}: int`"
            )
        annotation = hints[p.name]
        is_stream, item = _stream_item(annotation)
        if is_stream:
            if stream_param is not None:
                raise InterfaceError(
                    f"{where}: at most one streaming (AsyncIterator) parameter; "
                    f"{stream_param!r} and {p.name!r} both are"
                )
            stream_param, request_item, stream_position = p.name, item, len(params)
            _check_codec(where, f"the items of {p.name!r}", item)
            continue
        _check_codec(where, f"parameter {p.name!r}", annotation)
        params.append(
            Param(
                name=p.name,
                annotation=annotation,
                has_default=p.default is not p.empty,
                default=None if p.default is p.empty else p.default,
                keyword_only=p.kind is p.KEYWORD_ONLY,
            )
        )
    if "return" not in hints:
        raise InterfaceError(
            f"{where}: the return type needs an annotation, e.g. `-> int` (or `-> None`)"
        )
    streams_out, out_item = _stream_item(hints["return"])
    if inspect.isasyncgenfunction(func) and not streams_out:
        raise InterfaceError(f"{where}: an async generator must be annotated -> AsyncIterator[T]")
    if not streams_out and not _is_coroutine_function(func):
        raise InterfaceError(
            f"{where}: a unary or client-streaming method must be `async def` (it is a plain def)"
        )
    if streams_out:
        kind = MethodKind.BIDI_STREAM if stream_param else MethodKind.SERVER_STREAM
        result = out_item
    else:
        kind = MethodKind.CLIENT_STREAM if stream_param else MethodKind.UNARY
        result = hints["return"]
    _check_codec(where, "the result" if not streams_out else "the result items", result)
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
        stream_position=stream_position,
    )


def _is_coroutine_function(func: Any) -> bool:
    # A decorator that keeps ``__wrapped__`` (functools.wraps) around an ``async def`` counts.
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(inspect.unwrap(func))


def _check_implementation(cls: type, spec: MethodSpec) -> None:
    """An override in ``cls`` must have the shape its declaration needs."""
    impl = cls.__dict__.get(spec.attr)
    if impl is None or hasattr(impl, _RPC_ATTR) or not inspect.isfunction(impl):
        return  # not overridden here, or the declaration itself (checked above)
    where = f"{cls.__qualname__}.{spec.attr}"
    if spec.kind.streams_response:
        if inspect.isgeneratorfunction(impl) or (
            _is_coroutine_function(impl) and not inspect.isasyncgenfunction(impl)
        ):
            raise InterfaceError(
                f"{where}: {spec.full_name} streams its result: implement it as an async "
                "generator (`async def` with `yield`)"
            )
    elif inspect.isasyncgenfunction(impl):
        raise InterfaceError(
            f"{where}: {spec.full_name} returns one result: implement it as `async def` "
            "that returns it (no `yield`)"
        )
    elif not _is_coroutine_function(impl):
        raise InterfaceError(f"{where}: {spec.full_name} must be implemented as `async def`")


_CARRIED = (
    "None, bool, int, float, str, bytes, datetime/date/time/timedelta, UUID, Decimal, Enum, "
    "list/tuple/set/frozenset/dict of these, Optional/Union, Literal, dataclasses, TypedDict, "
    "NamedTuple, msgspec.Struct"
)


def _check_codec(where: str, what: str, annotation: Any) -> None:
    """Refuse a type that the codec cannot carry, naming the offending part of it."""
    import msgspec.inspect as mi

    if annotation is Any or annotation is object:
        return
    try:
        info = mi.type_info(annotation)
    except Exception as exc:
        raise InterfaceError(
            f"{where}: {what} has type {_type_name(annotation)}, which vrpc cannot carry "
            f"({exc}); use one of: {_CARRIED}"
        ) from None
    bad = _custom_type(info, set())
    if bad is not None:
        detail = "" if bad is annotation else f" (it contains {_type_name(bad)})"
        raise InterfaceError(
            f"{where}: {what} has type {_type_name(annotation)}{detail}, which vrpc cannot "
            f"carry: make it a dataclass or msgspec.Struct, or use one of: {_CARRIED}"
        )


def _custom_type(info: Any, seen: set[int]) -> Any:
    """The first type msgspec would treat as an opaque custom object, or None."""
    import msgspec.inspect as mi

    if id(info) in seen:
        return None
    seen.add(id(info))
    if isinstance(info, mi.CustomType):
        return None if info.cls is object else info.cls
    if isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
        cls_key = id(info.cls)
        if cls_key in seen:
            return None  # a recursive type: its fields are being checked already
        seen.add(cls_key)
        for field in info.fields:
            bad = _custom_type(field.type, seen)
            if bad is not None:
                return bad
        return None
    children: list[Any] = []
    for name in ("item_type", "key_type", "value_type"):
        child = getattr(info, name, None)
        if child is not None:
            children.append(child)
    children.extend(getattr(info, "item_types", ()) or ())
    children.extend(getattr(info, "types", ()) or ())
    for child in children:
        bad = _custom_type(child, seen)
        if bad is not None:
            return bad
    return None


def has_implementation(func: Any) -> bool:
    """False when a method's body (after its docstring) is only ``...`` or
    ``raise NotImplementedError``: an interface declaration, not something to serve. A ``pass``
    or docstring-only body is a legitimate no-op and counts as implemented."""
    func = getattr(func, "__func__", func)
    try:
        source = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return True  # no source to read: trust it
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return True
    body = list(node.body)
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if len(body) != 1:
        return True
    stmt = body[0]
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return stmt.value.value is not Ellipsis
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return not (isinstance(exc, ast.Name) and exc.id == "NotImplementedError")
    return True


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__
    return repr(tp).replace("typing.", "").replace("collections.abc.", "")


def _render_signature(attr: str, sig: inspect.Signature, hints: dict[str, Any]) -> str:
    parts = []
    star = False
    for i, p in enumerate(sig.parameters.values()):
        if i == 0:
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = f"{p.name}: {_type_name(hints[p.name])}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    return f"{attr}({', '.join(parts)}) -> {_type_name(hints['return'])}"
