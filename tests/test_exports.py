"""The public surface of the ``vrpc`` package."""

from __future__ import annotations

import inspect

import vrpc


def test_all_is_sorted_and_unique() -> None:
    assert list(vrpc.__all__) == sorted(set(vrpc.__all__))


def test_all_names_exist() -> None:
    for name in vrpc.__all__:
        assert hasattr(vrpc, name), name


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name, value in vars(vrpc).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public <= set(vrpc.__all__), public - set(vrpc.__all__)


def test_the_essentials_are_exported() -> None:
    for name in ("Service", "rpc", "Server", "connect", "Client", "Pool", "RpcError", "Status"):
        assert name in vrpc.__all__
