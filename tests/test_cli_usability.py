"""The command line as a new user meets it: `vrpc serve` from one's own folder, keyword and
streamed arguments, hints, quiet logs, one line per error with its exit code, the test root for
out-of-process clients, and a fast failure when nothing listens."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vrpc.cli import DEFAULT_CONNECT_TIMEOUT, _load_target, _parser, main

ROOT = Path(__file__).resolve().parents[1]
SEED = "usability"
EXAMPLES = ROOT / "docs" / "examples"

TOOLS = """
from collections.abc import AsyncIterator

import vrpc


class Tools(vrpc.Service, name="tools.v1"):
    @vrpc.rpc
    async def scale(self, x: int, *, factor: int = 2) -> int:
        raise NotImplementedError

    @vrpc.rpc
    async def total(self, items: AsyncIterator[int], start: int = 0) -> int:
        raise NotImplementedError

    @vrpc.rpc
    def doubled(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        raise NotImplementedError

    @vrpc.rpc
    def count(self, n: int) -> AsyncIterator[int]:
        raise NotImplementedError


class ToolsImpl(Tools):
    async def scale(self, x: int, *, factor: int = 2) -> int:
        return x * factor

    async def total(self, items: AsyncIterator[int], start: int = 0) -> int:
        return start + sum([i async for i in items])

    async def doubled(self, items: AsyncIterator[int]) -> AsyncIterator[int]:
        async for i in items:
            yield 2 * i

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
"""


@pytest.fixture(autouse=True)
def _structlog_config(keep_structlog_config: None) -> None:
    return None


@pytest.fixture
def insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")


def _env() -> dict[str, str]:
    return {**os.environ, "VRPC_INSECURE_TEST_ATTESTATION": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vrpc serve mytools:ToolsImpl` run from the folder holding mytools.py."""
    folder = tmp_path_factory.mktemp("app")
    (folder / "mytools.py").write_text(TOOLS)
    path = folder / "tools.sock"
    uri = f"unix://{path}"
    # -P: the current folder is not put on the import path by Python itself (as with the
    # installed `vrpc` script): only `vrpc serve` can make mytools importable.
    cmd = [sys.executable, "-P", "-m", "vrpc", "serve", "mytools:ToolsImpl"]
    cmd += ["--insecure-test-attester", "--seed", SEED, "--listen", uri]
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        for _ in range(1000):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(path))
                break
            except OSError:
                time.sleep(0.02)
        yield uri
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


def _call(uri: str, method: str, *extra: str) -> int:
    return main(["call", uri, method, "--insecure-test-seed", SEED, *extra])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vrpc: "), err
    return lines[0]


def test_keyword_arguments_as_a_json_object(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _call(served, "tools.v1.scale", "--args", '{"x": 3, "factor": 5}') == 0
    assert json.loads(capsys.readouterr().out) == 15
    assert _call(served, "tools.v1.scale", "--args", '{"x": 3}') == 0
    assert json.loads(capsys.readouterr().out) == 6
    assert _call(served, "tools.v1.scale", "--args", "[3, 4]") == 0  # positional still works
    assert json.loads(capsys.readouterr().out) == 12


def test_json_object_mistakes_are_usage_errors(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _call(served, "tools.v1.scale", "--args", '{"x": 3, "size": 1}') == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "tools.v1.scale has no parameter 'size' (its parameters: x, factor)" in line
    assert _call(served, "tools.v1.scale", "--args", '{"factor": 3}') == 2
    assert "missing argument 'x'" in _one_error_line(capsys.readouterr().err)


def test_streaming_without_stream_hints_at_it(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _call(served, "tools.v1.count", "--args", "[2]") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.endswith("is a server_stream method: call it with --stream")
    assert _call(served, "tools.v1.total") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "call it with --stream (request items are read from stdin" in line


def test_client_and_bidi_streaming_read_stdin_json_lines(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n2\n\n3\n"))
    assert _call(served, "tools.v1.total", "--stream", "--args", '{"start": 10}') == 0
    assert json.loads(capsys.readouterr().out) == 16
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n5\n"))
    assert _call(served, "tools.v1.doubled", "--stream") == 0
    assert capsys.readouterr().out.splitlines() == ["2", "10"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\nnot json\n"))
    assert _call(served, "tools.v1.total", "--stream") == 2
    assert "stdin line 2 is not valid JSON" in _one_error_line(capsys.readouterr().err)


def test_calls_log_only_errors_by_default(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _call(served, "tools.v1.scale", "--args", "[1]") == 0
    assert capsys.readouterr().err == ""
    assert _call(served, "tools.v1.scale", "--args", "[1]", "--log-level", "debug") == 0
    err = capsys.readouterr().err
    assert "connected" in err
    assert "test attester" not in err  # a client attests nothing
    assert _call(served, "tools.v1.scale", "--args", "[1]", "-q") == 0
    assert capsys.readouterr().err == ""
    argv = ["--log-format", "json", "--log-level", "info"]
    assert _call(served, "tools.v1.scale", "--args", "[1]", *argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert any(e["event"] == "connected" and e["level"] == "info" for e in events)


def test_wrong_seed_is_one_line_and_a_verification_failure(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["call", served, "tools.v1.scale", "--args", "[1]", "--insecure-test-seed", "other"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert "ChainInvalid" in line
    assert err.count("ChainInvalid") == 1


def test_test_root_lets_an_out_of_process_client_trust_a_dev_server(
    served: str, insecure: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, policy = tmp_path / "root.pem", tmp_path / "policy.json"
    argv = ["attest", "test-root", "--seed", SEED, "--root-out", str(root)]
    assert main([*argv, "--policy-out", str(policy)]) == 0
    call = ["call", served, "tools.v1.scale", "--args", "[2]", "-q"]
    assert main([*call, "--root", str(root), "--policy", str(policy)]) == 0
    assert json.loads(capsys.readouterr().out) == 4
    # Without files, both go to stdout: the PEM, then the policy.
    assert main(["attest", "test-root", "--seed", SEED, "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("-----BEGIN CERTIFICATE-----")
    assert json.loads(out[out.index("{") :])["format"] == "vrpc.attestation.policy/1"
    assert out[: out.index("{")] == root.read_text()


def test_missing_input_files_are_usage_errors(
    served: str, insecure: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.pem")
    assert main(["call", served, "tools.v1.scale", "--root", missing]) == 2
    assert "cannot read root" in _one_error_line(capsys.readouterr().err)
    assert main(["attest", "verify", missing]) == 2
    assert f"vrpc: cannot read {missing}" in _one_error_line(capsys.readouterr().err)
    assert main(["attest", "inspect", missing]) == 2
    assert f"vrpc: cannot read {missing}" in _one_error_line(capsys.readouterr().err)


def test_the_example_document_verifies_and_inspects(
    insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    document = str(EXAMPLES / "insecure-test-attestation.cbor")
    root = str(EXAMPLES / "insecure-test-root.pem")
    policy = json.loads((EXAMPLES / "insecure-test-policy.json").read_text())
    pins = [f"--pcr={i}={v}" for i, v in policy["pcrs"].items()]
    argv = ["attest", "verify", document, "--root", root, "--at-document-time", *pins, "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("VALID") and "INSECURE test root" in out
    assert main(["attest", "inspect", document, "-q"]) == 0
    assert "NOT VERIFIED" in capsys.readouterr().out
    # The AWS root rejects it: a verification failure, exit 1.
    assert main(["attest", "verify", document, "--at-document-time", "-q"]) == 1


def test_nothing_listening_fails_fast_and_clearly(
    tmp_path: Path, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _parser().parse_args(["call", "u", "m"]).connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert DEFAULT_CONNECT_TIMEOUT <= 2.0
    uri = f"unix://{tmp_path / 'nobody.sock'}"
    assert _call(uri, "tools.v1.scale") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert (
        line
        == f"vrpc: UNAVAILABLE: nothing listens at {uri}: {tmp_path / 'nobody.sock'} does not exist"
    )
    with socket.socket() as s:  # a loopback port with no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _call(f"tcp://127.0.0.1:{port}", "tools.v1.scale", "--connect-timeout", "0.2") == 1
    assert "UNAVAILABLE: cannot connect" in _one_error_line(capsys.readouterr().err)


def test_serve_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "no_such_module_here:Impl", "--listen", "memory://x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert "cannot import no_such_module_here: no such module" in line and "--app-dir" in line
    assert "coroutine" not in err
    argv = ["serve", "services.echo:Echo", "--insecure-test-attester", "--listen", "memory://y"]
    assert main([*argv, "-q"]) == 2
    assert "Echo.echo has no implementation" in _one_error_line(capsys.readouterr().err)


def test_app_dir_is_searched_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "appdir_probe_mod.py").write_text("VALUE = 42\n")
    assert _load_target("appdir_probe_mod:VALUE", str(tmp_path)) == 42
    assert sys.path[0] == str(tmp_path)
