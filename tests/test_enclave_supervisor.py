"""``vrpc enclave run``: the enclave as a foreground process for systemd, against a fake
nitro-cli (tests/enclave_helpers.py): exits 1 when the enclave stops, terminates it on SIGTERM,
replaces a leftover of its name, reports nitro-cli failures, and prints the enclave's logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog
from enclave_helpers import FakeNitro

from vrpc.cli import main
from vrpc.cli_enclave import EnclaveError, NitroCli, supervise
from vrpc.logforward import LogForwarder

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--eif-path", "/opt/vrpc/keyvault.eif", "--cpu-count", "2", "--memory", "2048"]


@pytest.fixture(autouse=True)
def _structlog_config(keep_structlog_config: None) -> None:
    # main() configures structlog for its process: undone after each test.
    return None


@pytest.fixture
def nitro(tmp_path: Path) -> FakeNitro:
    return FakeNitro(tmp_path / "nitro")


async def _supervise(nitro: FakeNitro, **kwargs: object) -> tuple[asyncio.Task[int], asyncio.Event]:
    stop = asyncio.Event()
    options: dict[str, object] = {"poll": 0.05, "log_retry": 0.05, "stop": stop}
    options.update(kwargs)
    task = asyncio.create_task(supervise(NitroCli(str(nitro.path)), RUN, **options))  # type: ignore[arg-type]
    return task, stop


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_exits_1_when_the_enclave_stops(nitro: FakeNitro) -> None:
    task, _ = await _supervise(nitro)
    await _until(lambda: "describe-enclaves" in nitro.commands())
    assert not task.done()  # running: the supervisor stays in the foreground
    nitro.kill_enclave()
    assert await asyncio.wait_for(task, 10) == 1
    run = nitro.calls()[0]
    assert run == ["run-enclave", *RUN]
    assert "terminate-enclave" not in nitro.commands()  # gone already: nothing to terminate


async def test_an_enclave_that_leaves_running_is_terminated_and_exits_1(nitro: FakeNitro) -> None:
    task, _ = await _supervise(nitro)
    await _until(lambda: "describe-enclaves" in nitro.commands())
    enclave_id = nitro.enclaves()[0]["EnclaveID"]
    nitro.set_state("TERMINATING")
    assert await asyncio.wait_for(task, 10) == 1
    assert ["terminate-enclave", "--enclave-id", enclave_id] in nitro.calls()


async def test_stop_terminates_the_enclave_and_exits_0(nitro: FakeNitro) -> None:
    task, stop = await _supervise(nitro)
    await _until(lambda: bool(nitro.enclaves()))
    enclave_id = nitro.enclaves()[0]["EnclaveID"]
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert nitro.calls()[-1] == ["terminate-enclave", "--enclave-id", enclave_id]
    assert nitro.enclaves() == []


async def test_stop_when_the_enclave_is_already_gone_still_exits_0(nitro: FakeNitro) -> None:
    task, stop = await _supervise(nitro, poll=60.0)  # the watcher does not notice first
    await _until(lambda: bool(nitro.enclaves()))
    nitro.kill_enclave()
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert nitro.commands()[-2:] == ["terminate-enclave", "describe-enclaves"]


async def test_stop_fails_when_the_enclave_cannot_be_terminated(nitro: FakeNitro) -> None:
    task, stop = await _supervise(nitro, poll=60.0)
    await _until(lambda: bool(nitro.enclaves()))
    nitro.fail("terminate-enclave", "E11 permission denied")
    stop.set()
    with pytest.raises(EnclaveError, match="terminate-enclave failed"):
        await asyncio.wait_for(task, 10)


async def test_describe_failing_three_times_counts_as_lost(nitro: FakeNitro) -> None:
    task, _ = await _supervise(nitro)
    await _until(lambda: bool(nitro.enclaves()))
    nitro.fail("describe-enclaves", "E39 cannot open /dev/nitro_enclaves")
    assert await asyncio.wait_for(task, 10) == 1
    assert nitro.commands().count("describe-enclaves") >= 3
    assert nitro.commands()[-1] == "terminate-enclave"  # fail closed: no unwatched enclave


async def test_a_leftover_of_the_same_name_is_terminated_first(nitro: FakeNitro) -> None:
    nitro.add_running("keyvault-16", "i-0-enc-leftover")
    task, stop = await _supervise(nitro, name="keyvault-16")
    await _until(lambda: "run-enclave" in nitro.commands())
    stop.set()
    assert await asyncio.wait_for(task, 10) == 0
    commands = nitro.calls()
    assert commands[0] == ["describe-enclaves"]
    assert commands[1] == ["terminate-enclave", "--enclave-id", "i-0-enc-leftover"]
    assert commands[2][0] == "run-enclave"


async def test_run_enclave_failure_is_a_clear_error(nitro: FakeNitro) -> None:
    nitro.fail("run-enclave", "[ E26 ] Insufficient memory requested.")
    with pytest.raises(EnclaveError, match=r"run-enclave failed \(exit 1\): .*Insufficient memory"):
        await supervise(NitroCli(str(nitro.path)), RUN, stop=asyncio.Event())


async def test_a_missing_nitro_cli_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(EnclaveError, match="--nitro-cli or VRPC_NITRO_CLI"):
        await supervise(NitroCli(str(tmp_path / "absent")), RUN, stop=asyncio.Event())


async def test_run_output_without_an_enclave_description_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "nitro-cli"
    fake.write_text("#!/bin/sh\necho 'Started enclave'\n")
    fake.chmod(0o755)
    with pytest.raises(EnclaveError, match="no JSON description"):
        await NitroCli(str(fake)).run_enclave(RUN)


async def test_the_enclaves_log_lines_are_printed_one_json_object_each(
    nitro: FakeNitro, tmp_path: Path
) -> None:
    # The enclave's side, here in-process on a unix socket instead of vsock://ANY:5001.
    forwarder = LogForwarder(f"unix://{tmp_path / 'logs.sock'}")
    logger = structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[structlog.processors.add_log_level, forwarder]
    )
    await forwarder.start()
    printed: list[str] = []
    try:
        logger.info("keys unsealed", generation=3)  # before the supervisor connects: buffered
        task, stop = await _supervise(
            nitro, logs=f"unix://{tmp_path / 'logs.sock'}", out=printed.append
        )
        await _until(lambda: len(printed) >= 1)
        logger.warning("sealing failed", operation="seal", error="AccessDenied\x1b[2J")
        await _until(lambda: len(printed) >= 2)
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        await forwarder.close()
    events = [json.loads(line) for line in printed]
    assert events == [
        {"event": "keys unsealed", "generation": 3, "level": "info"},
        {"event": "sealing failed", "operation": "seal", "error": "AccessDenied\x1b[2J",
         "level": "warning"},
    ]  # fmt: skip
    assert all("\x1b" not in line and line.isascii() for line in printed)


async def test_the_log_address_takes_the_enclaves_cid(nitro: FakeNitro, tmp_path: Path) -> None:
    forwarder = LogForwarder(f"unix://{tmp_path / 'enclave-16.sock'}")
    logger = structlog.wrap_logger(structlog.ReturnLogger(), processors=[forwarder])
    await forwarder.start()
    printed: list[str] = []
    try:
        logger.info("hello")
        task, stop = await _supervise(
            nitro, logs=f"unix://{tmp_path / 'enclave-{cid}.sock'}", out=printed.append
        )
        await _until(lambda: bool(printed))
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        await forwarder.close()
    assert json.loads(printed[0]) == {"event": "hello"}


def test_cli_usage_errors(nitro: FakeNitro, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["enclave", "run", *RUN, "--nitro-cli", str(nitro.path)]
    assert main([*base, "--logs", "http://x"]) == 2
    assert "--logs 'http://x'" in capsys.readouterr().err
    assert main([*base, "--logs", "vsock://{nope}:5001"]) == 2
    assert main([*base, "--poll", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["enclave", "run", "--eif-path", "x", "--cpu-count", "0", "--memory", "1"])
    assert nitro.calls() == []  # nothing was started


def _start(nitro: FakeNitro, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VRPC_NITRO_CLI": str(nitro.path)}
    cmd = [sys.executable, "-m", "vrpc", "enclave", "run", *RUN, "--poll", "0.05", *extra]
    return subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(condition: object, proc: subprocess.Popen[str]) -> None:
    for _ in range(500):
        if condition():  # type: ignore[operator]
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def _serve_lines(path: Path, lines: list[bytes]) -> threading.Thread:
    """A stand-in for the enclave's log stream: one reader, these lines, then held open."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"".join(lines))
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    conn.recv(1)  # until the supervisor goes away

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_the_command_prints_logs_forwards_sigterm_and_exits_0(
    nitro: FakeNitro, tmp_path: Path
) -> None:
    logs = tmp_path / "logs-16.sock"
    thread = _serve_lines(logs, [b"junk\n", b'{"event": "keys unsealed", "level": "info"}\n'])
    proc = _start(
        nitro, tmp_path, "--logs", f"unix://{tmp_path}/logs-{{cid}}.sock", "--enclave-name", "kv"
    )
    try:
        _wait_for(lambda: "describe-enclaves" in nitro.commands()[1:], proc)
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 10)[0], "no log line printed"
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        rest, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    thread.join(10)
    assert nitro.commands()[-1] == "terminate-enclave"
    assert nitro.enclaves() == []
    assert "enclave started" in err and "terminating the enclave" in err
    assert first == '{"event":"keys unsealed","level":"info"}\n'  # journald's input
    assert rest == ""
    assert "enclave log line rejected" in err


def test_the_command_exits_1_when_the_enclave_dies(nitro: FakeNitro, tmp_path: Path) -> None:
    proc = _start(nitro, tmp_path, "--logs", "none")
    try:
        _wait_for(lambda: "describe-enclaves" in nitro.commands(), proc)
        nitro.kill_enclave()
        assert proc.wait(10) == 1  # systemd's Restart=always starts a new one
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "enclave stopped" in err and "the enclave is gone" in err


def test_cli_reports_a_failed_start_in_one_line(
    nitro: FakeNitro, capsys: pytest.CaptureFixture[str]
) -> None:
    nitro.fail("run-enclave", "[ E26 ] Insufficient memory requested.")
    code = main(["enclave", "run", *RUN, "--nitro-cli", str(nitro.path), "--logs", "none"])
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vrpc: ")]
    assert errors == [
        "vrpc: EnclaveError: nitro-cli run-enclave failed (exit 1): "
        "[ E26 ] Insufficient memory requested."
    ]
