"""The shipped testing kit (vrpc.testing) and its opt-in pytest plugin, including the complete
user test file that docs/testing.md shows, run as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import vrpc
from vrpc.attestation import INSECURE_ENV_VAR
from vrpc.testing import client_for_tests, serve_for_tests, server_for_tests

ROOT = Path(__file__).resolve().parents[1]


class Counter(vrpc.Service, name="counter.v1"):
    @vrpc.rpc
    async def add(self, a: int, *, b: int = 1) -> int:
        raise NotImplementedError

    @vrpc.rpc
    def upto(self, n: int) -> AsyncIterator[int]:
        raise NotImplementedError


class CounterImpl(Counter):
    async def add(self, a: int, *, b: int = 1) -> int:
        return a + b

    async def upto(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i


@pytest.fixture
def no_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INSECURE_ENV_VAR, raising=False)


@pytest.mark.usefixtures("no_opt_in")
async def test_serve_for_tests_gives_an_attested_client_and_scopes_the_opt_in() -> None:
    async with serve_for_tests([CounterImpl()]) as client:
        assert client.mode == "dev-insecure"
        assert len(client.channel_binding) == 48  # a real handshake happened
        stub = client.stub(Counter)
        assert await stub.add(2, b=5) == 7
        assert [i async for i in stub.upto(3)] == [0, 1, 2]
        # The environment opt-in was set only while the trust root was built.
        assert INSECURE_ENV_VAR not in os.environ
    assert INSECURE_ENV_VAR not in os.environ
    # Trusting a test root yourself still needs the opt-in: the kit did not leave it behind.
    with pytest.raises(vrpc.AttestationError, match=INSECURE_ENV_VAR):
        vrpc.InsecureTestAttester(seed=b"x").trust_root()


async def test_the_opt_in_is_restored_to_its_previous_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(INSECURE_ENV_VAR, "0")
    client_for_tests("memory://unused")
    assert os.environ[INSECURE_ENV_VAR] == "0"


@pytest.mark.usefixtures("no_opt_in")
async def test_kit_over_a_unix_socket_with_server_options(tmp_path: Path) -> None:
    uri = f"unix://{tmp_path / 'kit.sock'}"
    async with (
        server_for_tests([CounterImpl()], uri=uri, reflection=False) as server,
        client_for_tests(uri) as client,
    ):
        assert "vrpc.reflection.list_services" not in server.methods
        assert await client.stub(Counter).add(1) == 2
    # Closed afterwards: nothing listens any more.
    with pytest.raises(vrpc.RpcError):
        async with client_for_tests(uri, connect_timeout=0.1):
            pass


def _doc_test_file() -> str:
    text = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    files = [b for b in blocks if b.startswith("# test_greeter.py\n")]
    assert len(files) == 1, "docs/testing.md shows one complete test file"
    return files[0]


def _setup_lines(source: str) -> int:
    """Lines that are neither the service under test nor a test: the set-up a user writes.

    A top-level ``class`` or ``def test_*`` block runs to the next line that is not indented
    (read line by line: the ``ast`` module is unreliable in a process whose C recursion count
    a RecursionError elsewhere in the suite has disturbed, on CPython 3.11)."""
    skipped: set[int] = set()
    lines = source.splitlines()
    in_block = False
    for n, line in enumerate(lines, 1):
        starts = re.match(r"(class |(async )?def test_)", line) is not None
        if starts:
            in_block = True
        elif line and not line[0].isspace():
            in_block = False
        if in_block:
            skipped.add(n)
    return sum(
        1
        for n, line in enumerate(lines, 1)
        if n not in skipped and line.strip() and not line.lstrip().startswith("#")
    )


def _run_pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VRPC_"))}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's vrpc, wherever the test runs
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_documented_user_test_file_runs(tmp_path: Path) -> None:
    source = _doc_test_file()
    assert _setup_lines(source) < 15
    (tmp_path / "test_greeter.py").write_text(source)
    result = _run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


_NO_SERVICES = """
import vrpc

async def test_forgot(vrpc_client: vrpc.Client) -> None:
    pass
"""


def test_plugin_is_opt_in_and_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "test_forgot.py").write_text(_NO_SERVICES)
    # Not enabled: the fixture does not exist.
    result = _run_pytest(tmp_path)
    assert result.returncode != 0
    assert "fixture 'vrpc_client' not found" in result.stdout
    # Enabled through the setting the entry point reads (the entry module loaded by hand here,
    # as the installed entry point would load it; `no:vrpc` keeps an installed one out of the
    # way): the missing vrpc_services is named.
    (tmp_path / "pytest.ini").write_text("[pytest]\nvrpc_fixtures = true\n")
    result = _run_pytest(tmp_path, "-p", "no:vrpc", "-p", "vrpc.testing._entry")
    assert result.returncode != 0
    assert "define a fixture named vrpc_services" in result.stdout + result.stderr


_MORE = """
import pytest
import vrpc

pytestmark = pytest.mark.asyncio


class Hello(vrpc.Service, name="hello.v1"):
    @vrpc.rpc
    async def hi(self) -> str:
        return "hi"


@pytest.fixture
def vrpc_services() -> list[vrpc.Service]:
    return [Hello()]


@pytest.fixture
def vrpc_server_options() -> dict[str, object]:
    return {"reflection": False}


async def test_options_reach_the_server(vrpc_client: vrpc.Client) -> None:
    assert await vrpc_client.stub(Hello).hi() == "hi"
    with pytest.raises(vrpc.RpcError) as info:
        await vrpc_client.call("vrpc.reflection.list_services", [])
    assert info.value.status is vrpc.Status.UNIMPLEMENTED


async def test_serve_and_attester(vrpc_serve, vrpc_attester: vrpc.InsecureTestAttester) -> None:
    async with vrpc_serve([Hello()], attester=vrpc_attester) as client:
        assert client.peer_claims.module_id == vrpc_attester.module_id
"""


def test_the_other_fixtures(tmp_path: Path) -> None:
    (tmp_path / "test_more.py").write_text(_MORE)
    result = _run_pytest(tmp_path, "-p", "vrpc.testing.pytest_plugin")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_entry_point_is_declared() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"vrpc": "vrpc.testing._entry"}
