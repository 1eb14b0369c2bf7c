"""Unix socket paths: a live server's path is never taken over, a stale socket file is replaced,
and a server removes its own socket file (and only its own) when it closes."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vrpc
from services.echo import Echo, EchoImpl


def _path(tmp_path: Path, name: str = "s.sock") -> tuple[str, Path]:
    path = tmp_path / name
    return f"unix://{path}", path


async def test_second_server_refuses_a_live_path_and_the_first_keeps_serving(
    tmp_path: Path, server_at: Callable[..., Any], new_client: Callable[..., vrpc.Client]
) -> None:
    uri, path = _path(tmp_path)
    async with server_at(uri, [EchoImpl()]):
        second = vrpc.Server([EchoImpl()], attester=vrpc.InsecureTestAttester(seed=b"two"))
        with pytest.raises(OSError, match="another server is listening on this socket") as info:
            await second.start(uri)
        assert info.value.errno == errno.EADDRINUSE
        await second.close(grace=0)
        assert path.exists()
        async with new_client(uri) as client:
            assert await client.stub(Echo).echo(b"first") == b"first"


async def test_closing_removes_the_socket_file(
    tmp_path: Path, server_at: Callable[..., Any]
) -> None:
    uri, path = _path(tmp_path)
    async with server_at(uri, [EchoImpl()]):
        assert path.is_socket()
    assert not path.exists()


async def test_a_stale_socket_file_is_replaced(
    tmp_path: Path, server_at: Callable[..., Any], new_client: Callable[..., vrpc.Client]
) -> None:
    uri, path = _path(tmp_path)
    # What a crashed server leaves behind: a socket file nobody listens on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.is_socket()
    async with server_at(uri, [EchoImpl()]), new_client(uri) as client:
        assert await client.stub(Echo).echo(b"fresh") == b"fresh"
    assert not path.exists()


async def test_a_file_that_is_not_a_socket_is_never_removed(
    tmp_path: Path, server_at: Callable[..., Any]
) -> None:
    uri, path = _path(tmp_path)
    path.write_text("precious")
    with pytest.raises(OSError):
        async with server_at(uri, [EchoImpl()]):
            pass
    assert path.read_text() == "precious"


async def test_closing_leaves_a_successors_socket_alone(
    tmp_path: Path, server_at: Callable[..., Any], new_client: Callable[..., vrpc.Client]
) -> None:
    uri, path = _path(tmp_path)
    first = vrpc.Server([EchoImpl()], attester=vrpc.InsecureTestAttester(seed=b"one"))
    await first.start(uri)
    os.unlink(path)  # someone removed the file; a new server then binds the free path
    async with server_at(uri, [EchoImpl()]):
        await first.close(grace=0)
        assert path.is_socket()
        async with new_client(uri) as client:
            assert await client.stub(Echo).echo(b"successor") == b"successor"
