"""Packaging: the license as an SPDX expression, an editable install that type checkers see, and
typed packages that a user's mypy --strict checks stub calls against."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it() -> None:
    data = _pyproject()
    assert data["project"]["license"] == "Apache-2.0"  # type: ignore[index]
    requires = data["build-system"]["requires"]  # type: ignore[index]
    (setuptools,) = [r for r in requires if r.startswith("setuptools")]
    found = re.fullmatch(r"setuptools>=(\d+)", setuptools)
    assert found is not None and int(found.group(1)) >= 77  # PEP 639 support


def test_the_makefile_installs_an_editable_that_type_checkers_see() -> None:
    # setuptools' default editable mode for this layout is an import hook, which mypy and
    # pyright cannot follow; compat mode writes a plain path entry.
    makefile = (ROOT / "Makefile").read_text()
    (install,) = [line for line in makefile.splitlines() if "pip install" in line and "-e" in line]
    assert "--config-settings editable_mode=compat" in install


def test_both_packages_are_typed() -> None:
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]  # type: ignore[index]
    for package in ("vrpc", "services"):
        assert (ROOT / package / "py.typed").is_file()
        assert package_data[package] == ["py.typed"]


USER_FILE = """
import vrpc
from services.echo import Echo


class Greeter(vrpc.Service, name="greeter.v1"):
    @vrpc.rpc
    async def greet(self, name: str, *, punctuation: str = "!") -> str:
        raise NotImplementedError


async def main() -> None:
    async with vrpc.connect("unix:///tmp/x.sock") as client:
        echo = client.stub(Echo)
        data: bytes = await echo.echo(b"hi")
        text: str = await client.stub(Greeter).greet("Ada", punctuation="?")
        print(data, text)
        await echo.echo(42)
        await client.stub(Greeter).greet("Ada", bang=True)
"""


@pytest.mark.slow
def test_mypy_strict_outside_the_checkout_checks_stub_calls(tmp_path: Path) -> None:
    # An environment laid out as compat mode leaves it: a path entry (.pth) naming the checkout,
    # beside the dependencies. mypy reads .pth files of the interpreter it is pointed at.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]  # this environment's msgspec, cryptography, ...
    (Path(site) / "__editable__.vrpc.pth").write_text(f"{ROOT}\n")
    (Path(site) / "deps.pth").write_text(f"{deps}\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "use_vrpc.py").write_text(USER_FILE)
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    command = [sys.executable, "-m", "mypy", "--strict", "--python-executable", str(python)]
    result = subprocess.run(
        [*command, "--cache-dir", str(tmp_path / "cache"), "use_vrpc.py"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, result.stdout + result.stderr
    assert 'Argument 1 to "echo" of "Echo" has incompatible type "int"' in errors[0]
    assert 'Unexpected keyword argument "bang" for "greet" of "Greeter"' in errors[1]
