"""The ``vrpc`` command line: ``serve`` as a real subprocess, ``call`` and ``describe`` in process
against it, and the one-line errors for the usual mistakes (exit 2 for usage and input mistakes,
1 for failures)."""

from __future__ import annotations

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

from vrpc.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEED = "cli-tests"


@pytest.fixture(autouse=True)
def _structlog_config(keep_structlog_config: None) -> None:
    # main() points the default structlog printer at stderr: undone after each test.
    return None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vrpc serve services.echo:EchoImpl`` in a subprocess; yields its address."""
    path = tmp_path_factory.mktemp("cli") / "echo.sock"
    uri = f"unix://{path}"
    env = {**os.environ, "VRPC_INSECURE_TEST_ATTESTATION": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vrpc", "serve", "services.echo:EchoImpl"]
    cmd += ["--insecure-test-attester", "--seed", SEED, "--listen", uri]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
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
            assert proc.wait(10) == 0  # SIGTERM drains and exits cleanly
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture
def insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRPC_INSECURE_TEST_ATTESTATION", "1")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("vrpc: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_call_prints_json_with_bytes_as_b64(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = json.dumps([{"$b64": "aGVsbG8gdnJwYw=="}])
    assert main(["call", served, "echo.v1.echo", "--args", args, "--insecure-test-seed", SEED]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"$b64": "aGVsbG8gdnJwYw=="}  # stdout is the result alone


def test_call_stream_prints_one_line_per_item(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["call", served, "echo.v1.stream", "--stream", "--args", "[2, 3]"]
    assert main([*argv, "--insecure-test-seed", SEED]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [{"$b64": "Wlo="}] * 3


def test_describe_lists_services_and_signatures(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["describe", served, "--insecure-test-seed", SEED]) == 0
    out = capsys.readouterr().out
    assert "echo.v1\n" in out
    assert "echo(data: bytes) -> bytes" in out
    assert "stream(size: int, count: int) -> AsyncIterator[bytes]" in out
    assert "vrpc.health" in out


def test_describe_shows_json_schemas(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["describe", served, "--insecure-test-seed", SEED]) == 0
    out = capsys.readouterr().out
    assert 'arguments: {"size": {"type": "integer"}, "count": {"type": "integer"}}' in out
    assert 'result: {"type": "object", "properties": {"$b64"' in out
    assert main(["describe", served, "--insecure-test-seed", SEED, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    echo = {m["name"]: m for m in listing["echo.v1"]}["echo.v1.echo"]
    assert echo["schema"]["arguments"]["required"] == ["data"]
    assert echo["schema"]["result"]["required"] == ["$b64"]


def test_unknown_method_is_unimplemented(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", served, "echo.v1.nope", "--insecure-test-seed", SEED]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("vrpc: UNIMPLEMENTED:") and "echo.v1.nope" in line


def test_wrong_seed_is_refused(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # The client trusts a different (test) root: the attestation must not verify.
    assert main(["call", served, "echo.v1.echo", "--insecure-test-seed", "other"]) == 1
    assert "vrpc: " in _one_error_line(capsys.readouterr().err)


def test_bad_uri(insecure: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["call", "bogus://x", "echo.v1.echo", "--insecure-test-seed", SEED]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "bogus://x" in line and "unix://" in line


def test_bad_json_arguments(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["call", served, "echo.v1.echo", "--args", "[1", "--insecure-test-seed", SEED]
    assert main(argv) == 2
    assert "--args is not valid JSON" in _one_error_line(capsys.readouterr().err)


def test_bad_base64_argument(
    served: str, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["call", served, "echo.v1.echo", "--args", '[{"$b64": "!!"}]']
    assert main([*argv, "--insecure-test-seed", SEED]) == 2
    assert "invalid base64" in _one_error_line(capsys.readouterr().err)


def test_unreachable_address_is_unavailable_and_names_it(
    tmp_path: Path, insecure: None, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"unix://{tmp_path / 'nobody.sock'}"
    argv = ["call", uri, "echo.v1.echo", "--insecure-test-seed", SEED, "--timeout", "0.5"]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("vrpc: UNAVAILABLE:") and uri in line


def test_prod_client_without_a_policy_says_how_to_make_one(
    served: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", served, "echo.v1.echo"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "vrpc attest policy" in line and "policy" in line


def test_serve_with_a_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "services.echo", "--listen", "unix:///nonexistent/x.sock"]) == 2
    assert "expected MODULE:ATTR" in _one_error_line(capsys.readouterr().err)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["call"])
    assert exc.value.code == 2
