"""Checking arguments and results against the declared type hints.

msgspec's ``convert`` does the work (primitives, bytes, lists, dicts, optionals/unions, enums,
dataclasses, ...); the common primitive annotations take a cheaper exact-type path first because
this runs for every argument of every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from vrpc.exceptions import RpcError
from vrpc.service import InterfaceError, MethodSpec, Service, describe_service, has_implementation
from vrpc.status import Status

__all__ = ["ArgumentBinder", "converter_for", "handler_for", "served_methods"]

_EXACT = (bytes, str, int, bool)


def converter_for(tp: Any) -> Callable[[Any], Any]:
    """A function that returns the value converted to ``tp`` or raises msgspec.ValidationError."""
    if tp is Any or tp is object:
        return lambda value: value
    if tp is None or tp is type(None):
        tp = type(None)
    convert = msgspec.convert
    if tp in _EXACT:
        name = tp.__name__

        def exact(value: Any) -> Any:
            if type(value) is tp:
                return value
            if tp is bytes or tp is str or type(value) in (bytes, str):
                # msgspec would base64-decode a str into bytes; vrpc carries bytes natively
                raise msgspec.ValidationError(f"Expected `{name}`, got `{type(value).__name__}`")
            return convert(value, tp, strict=True)

        return exact

    def general(value: Any) -> Any:
        return convert(value, tp, strict=True)

    return general


class ArgumentBinder:
    """Turns the positional argument list of a REQUEST into validated handler arguments."""

    __slots__ = ("_converters", "_defaults", "_exact", "_names", "_required", "_spec")

    def __init__(self, spec: MethodSpec) -> None:
        self._spec = spec
        self._names = [p.name for p in spec.params]
        self._converters = [converter_for(p.annotation) for p in spec.params]
        self._defaults = [p.default for p in spec.params]
        # The wire list is positional: every parameter up to the last one without a default
        # must be present (a keyword-only one without a default may follow optional ones).
        self._required = max(
            (i + 1 for i, p in enumerate(spec.params) if not p.has_default), default=0
        )
        # When every parameter is a plain bytes/str/int/bool, a full argument list whose values
        # have exactly those types needs no conversion at all: the common case, checked first.
        exact = [p.annotation for p in spec.params]
        self._exact = tuple(exact) if all(tp in _EXACT for tp in exact) else None

    def bind(self, args: list[Any]) -> list[Any]:
        exact = self._exact
        if exact is not None and len(args) == len(exact):
            for value, tp in zip(args, exact, strict=True):
                if type(value) is not tp:
                    break
            else:
                return args
        count = len(args)
        if count < self._required or count > len(self._names):
            expected = (
                f"{self._required}"
                if self._required == len(self._names)
                else f"{self._required} to {len(self._names)}"
            )
            noun = "argument" if expected == "1" else "arguments"
            raise RpcError(
                Status.INVALID_ARGUMENT,
                f"{self._spec.full_name} takes {expected} {noun}, got {count}",
                {"arguments": [self._required, len(self._names)], "got": count},
            )
        out = []
        for i, value in enumerate(args):
            try:
                out.append(self._converters[i](value))
            except (msgspec.ValidationError, TypeError) as exc:
                name = self._names[i]
                raise RpcError(
                    Status.INVALID_ARGUMENT,
                    f"invalid argument {name!r}: {exc}",
                    {"parameter": name},
                ) from None
        if count < len(self._names):
            out.extend(self._defaults[count:])
        return out


def handler_for(spec: MethodSpec, handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler`` made callable with the bound argument list (the streaming parameter last).

    Most handlers take that list positionally as it is. Keyword-only parameters, and a
    streaming parameter declared before others, need the list spread back into the
    declaration's shape: only those methods pay for the extra call.
    """
    positional = [p.name for p in spec.params if not p.keyword_only]
    keywords = [p.name for p in spec.params if p.keyword_only]
    stream_last = spec.stream_position is None or spec.stream_position == len(positional)
    if not keywords and stream_last:
        return handler
    count = len(positional)
    where = spec.stream_position
    has_stream = spec.stream_param is not None

    def spread(*args: Any) -> Any:
        values = list(args)
        stream = values.pop() if has_stream else None
        head = values[:count]
        if has_stream:
            head.insert(where if where is not None else count, stream)
        return handler(*head, **dict(zip(keywords, values[count:], strict=True)))

    return spread


def served_methods(service: Any) -> list[tuple[MethodSpec, Callable[..., Any]]]:
    """The methods of a service instance a server can dispatch to, each with its handler.

    Refuses what would otherwise fail at every call: a class instead of an instance, and an
    interface whose methods have no body (``...``) instead of an implementation.
    """
    if isinstance(service, type):
        name = service.__qualname__
        raise InterfaceError(
            f"Server takes service instances, not the class {name}, which is an interface: "
            f"pass an instance of a subclass that implements its methods"
            if _is_interface(service)
            else f"Server takes service instances, not the class {name}: pass {name}()"
        )
    if not isinstance(service, Service):
        raise InterfaceError(f"{service!r} is not a vrpc.Service instance")
    cls = type(service)
    out = []
    for spec in describe_service(cls).values():
        handler = getattr(service, spec.attr)
        if not has_implementation(handler):
            raise InterfaceError(
                f"{cls.__qualname__}.{spec.attr} has no implementation (its body is only `...` or"
                " `raise NotImplementedError`): {cls.__qualname__} is an interface; "
                "serve an instance of a subclass that implements its methods"
            )
        out.append((spec, handler_for(spec, handler)))
    return out


def _is_interface(cls: type) -> bool:
    if not issubclass(cls, Service):
        return False
    try:
        specs = describe_service(cls)
    except TypeError:
        return False
    return bool(specs) and not any(
        has_implementation(getattr(cls, spec.attr)) for spec in specs.values()
    )
