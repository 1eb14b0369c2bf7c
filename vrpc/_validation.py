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
from vrpc.service import MethodSpec
from vrpc.status import Status

__all__ = ["ArgumentBinder", "converter_for"]

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
        self._required = sum(1 for p in spec.params if not p.has_default)
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
            raise RpcError(
                Status.INVALID_ARGUMENT,
                f"{self._spec.full_name} takes {expected} arguments, got {count}",
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
