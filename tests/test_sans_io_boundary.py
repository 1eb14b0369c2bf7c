"""vrpc.proto is sans-IO: importing it loads no asyncio, socket or shell module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO = Path(__file__).resolve().parents[1] / "vrpc" / "proto"
FORBIDDEN = {"asyncio", "socket", "time", "selectors", "threading", "uvloop", "trio"}
MODULES = sorted(p for p in PROTO.glob("*.py"))


# Which modules vrpc.proto may import is an import-linter contract in pyproject.toml ("The
# sans-IO core does no I/O and knows no shell", checked by `make lint`); this test checks what
# actually loads at run time, third-party dependencies included.


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
