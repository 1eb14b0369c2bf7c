"""Typed client stubs built from a service interface.

``client.stub(KeyVault)`` returns an instance of a generated subclass of ``KeyVault`` whose
``@rpc`` methods perform calls; mypy sees it as ``KeyVault``, so every call is checked against
the interface's exact signature. Results come back converted to the declared return type
(dataclasses, enums, ...).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from vrpc._validation import converter_for
from vrpc.service import MethodKind, MethodSpec, Service, describe_service

if TYPE_CHECKING:
    from vrpc.channel import Channel

__all__ = ["make_stub"]

T = TypeVar("T", bound=Service)


def _arg_packer(spec: MethodSpec, func: Any) -> Any:
    """Map (args, kwargs) as the interface accepts them to the wire's positional list."""
    sig = inspect.signature(func)
    params = [p for i, p in enumerate(sig.parameters.values()) if i > 0]
    wire_names = [p.name for p in spec.params]
    count = len(wire_names)
    simple = spec.stream_param is None and all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params
    )

    def pack(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
        if simple and not kwargs and len(args) == count:
            return list(args), None
        bound = sig.bind(None, *args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        stream = values.get(spec.stream_param) if spec.stream_param else None
        return [values[name] for name in wire_names], stream

    return pack


# The generated class of each interface, made once: building one runs the interface checks of
# ``Service.__init_subclass__`` and reads every method's signature, ~1 ms, which a client made per
# connection would otherwise pay each time. The channel is per instance.
_STUB_CLASSES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def make_stub(channel: Channel, interface: type[T]) -> T:
    """An instance of a generated subclass of ``interface`` whose ``@rpc`` methods call
    through ``channel`` (a ``Client`` or a ``Pool``)."""
    cls = _STUB_CLASSES.get(interface)
    if cls is None:
        specs = describe_service(interface)
        namespace: dict[str, Any] = {"__slots__": ("_vrpc_channel",), "_vrpc_stub": True}
        for spec in specs.values():
            declared = getattr(interface, spec.attr)
            namespace[spec.attr] = _make_method(spec, declared)
        cls = _STUB_CLASSES[interface] = type(f"{interface.__name__}Stub", (interface,), namespace)
    stub: T = object.__new__(cls)
    stub._vrpc_channel = channel  # type: ignore[attr-defined]
    return stub


def _make_method(spec: MethodSpec, declared: Any) -> Any:
    pack = _arg_packer(spec, declared)
    convert = converter_for(spec.result_type)
    name = spec.full_name
    idempotent = spec.idempotent
    timeout = spec.timeout
    method: Any
    if spec.kind is MethodKind.UNARY:

        def unary(self: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
            # A plain function returning the channel's coroutine: no coroutine frame of its own
            # per call (the channel applies ``convert``).
            wire, _ = pack(args, kwargs)
            return self._vrpc_channel.call(  # type: ignore[no-any-return]
                name, wire, idempotent=idempotent, timeout=timeout, convert=convert
            )

        method = unary
    elif spec.kind is MethodKind.CLIENT_STREAM:

        async def client_stream(self: Any, *args: Any, **kwargs: Any) -> Any:
            wire, request = pack(args, kwargs)
            async for result in self._vrpc_channel.stream(
                name, wire, request=request, stream_response=False, timeout=timeout, convert=convert
            ):
                return result
            raise AssertionError("a client-streaming call yields its result")

        method = client_stream
    else:

        def streaming(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            wire, request = pack(args, kwargs)
            return self._vrpc_channel.stream(  # type: ignore[no-any-return]
                name,
                wire,
                request=request if spec.kind is MethodKind.BIDI_STREAM else None,
                timeout=timeout,
                convert=convert,
            )

        method = streaming
    method.__name__ = spec.attr
    method.__qualname__ = f"{spec.service}.{spec.attr}"
    method.__doc__ = declared.__doc__
    return method
