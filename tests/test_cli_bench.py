"""`vrpc bench ARGS` hands every argument to the benchmark suite's own parser."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from vrpc.cli import main


def test_bench_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = importlib.import_module("benchmarks.__main__")
    seen: list[Any] = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--quick", "--out", "/tmp/x", "--systems", "raw-echo"]) == 0
    assert seen == [["--quick", "--out", "/tmp/x", "--systems", "raw-echo"]]
    assert main(["bench"]) == 0
    assert seen[-1] == []
