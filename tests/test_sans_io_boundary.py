"""vrpc.proto is sans-IO: none of its modules may import asyncio, socket, time (or the shells)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROTO = Path(__file__).resolve().parents[1] / "vrpc" / "proto"
FORBIDDEN = {"asyncio", "socket", "time", "selectors", "threading", "uvloop", "trio"}
MODULES = sorted(p for p in PROTO.glob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_proto_module_imports_nothing_with_io(path: Path) -> None:
    imported = _imports(path)
    top = {name.split(".")[0] for name in imported}
    assert not top & FORBIDDEN, f"{path.name} imports {top & FORBIDDEN}"
    # nor the asyncio shells of vrpc itself
    shells = {"vrpc._shell", "vrpc.server", "vrpc.client", "vrpc.pool", "vrpc.transport"}
    assert not {n for n in imported if any(n.startswith(s) for s in shells)}


def test_the_ast_check_would_notice_an_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom asyncio import sleep\nimport time as t\n")
    assert {"asyncio", "time"} <= _imports(bad)


def test_importing_vrpc_proto_does_not_load_asyncio() -> None:
    assert MODULES
    names = [f"vrpc.proto.{p.stem}" for p in MODULES if p.stem != "__init__"]
    # ``time`` is absent from this list: the interpreter loads it at start-up (zipimport), so only
    # the AST check above can police it. vrpc/__init__.py re-exports the asyncio shells: load
    # the package without it, so the check sees what vrpc.proto itself (and its third-party
    # dependencies) pulls in.
    code = (
        "import sys, importlib, types\n"
        f"pkg = types.ModuleType('vrpc'); pkg.__path__ = [{str(PROTO.parent)!r}]\n"
        "sys.modules['vrpc'] = pkg\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "print(sorted(m for m in ('asyncio', 'socket', 'vrpc._shell', 'vrpc.server',"
        " 'vrpc.client', 'vrpc.transport') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROTO.parents[1],
        timeout=60,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
