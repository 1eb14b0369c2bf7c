"""Typed stubs: mypy --strict sees ``client.stub(Interface)`` as the interface itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = Path(__file__).resolve().parent / "typing"


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = tmp_path_factory.mktemp("mypy-cache")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(cache),
            "--namespace-packages",
            "--explicit-package-bases",
            str(SNIPPETS / "typed_host.py"),
            str(SNIPPETS / "wrong_argument.py"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    return result.stdout + result.stderr


def _lines(output: str, name: str) -> list[str]:
    return [line for line in output.splitlines() if f"{name}.py:" in line]


def test_host_module_passes_strict(mypy_output: str) -> None:
    lines = _lines(mypy_output, "typed_host")
    assert lines, mypy_output
    assert not [line for line in lines if ": error:" in line], mypy_output


def test_reveal_type_sees_the_interface_types(mypy_output: str) -> None:
    notes = [
        line.split("Revealed type is ")[1]
        for line in _lines(mypy_output, "typed_host")
        if "Revealed type is " in line
    ]
    assert notes == [
        '"tests.typing.typed_host.Store"',
        '"tests.typing.typed_host.Item"',
        '"bool"',
        '"tests.typing.typed_host.Item"',
        '"int"',
        '"dict[str, Any]"',
    ], mypy_output


def test_wrong_argument_type_is_an_error(mypy_output: str) -> None:
    errors = [line for line in _lines(mypy_output, "wrong_argument") if ": error:" in line]
    assert len(errors) == 1, mypy_output
    assert (
        'Argument 1 to "get" of "Store" has incompatible type "int"; expected "str"' in (errors[0])
    )
    assert "[arg-type]" in errors[0]
