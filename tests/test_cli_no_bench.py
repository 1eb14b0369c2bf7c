"""The benchmark suite is run from the checkout (`python -m benchmarks`), never through vrpc."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import vrpc
from vrpc.cli import main

VRPC_DIR = Path(vrpc.__file__).resolve().parent


def test_vrpc_has_no_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick"])
    assert info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_no_vrpc_module_imports_benchmarks_or_edits_sys_path(tmp_path: Path) -> None:
    names = [
        m.name
        for m in pkgutil.walk_packages([str(VRPC_DIR)], prefix="vrpc.")
        if not m.name.endswith("__main__")
    ]
    code = (
        "import importlib, sys\n"
        f"before = list(sys.path)\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert sys.path == before, 'sys.path changed'\n"
        "bad = sorted(m for m in sys.modules if m == 'benchmarks' or m.startswith('benchmarks.'))\n"
        "assert not bad, bad\n"
    )
    # From elsewhere, with only this checkout's root on the path (benchmarks/ importable there,
    # so an import of it would succeed and be seen).
    env = {**os.environ, "PYTHONPATH": str(VRPC_DIR.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(names) > 10


def test_no_vrpc_source_mentions_benchmarks_imports() -> None:
    for path in VRPC_DIR.rglob("*.py"):
        text = path.read_text()
        assert "from benchmarks" not in text and "import benchmarks" not in text, path
