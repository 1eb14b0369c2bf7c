"""Enclave logs to the parent (vrpc/logforward.py, read by ``vrpc enclave run``): what is
forwarded (redacted events, one JSON object a line), buffering and its bound, one reader at a
time, the reader's checks, and a keyvault run whose forwarded logs hold no secret."""

from __future__ import annotations

import asyncio
import datetime
import enum
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hostile_helpers import MARKER, attester, client, serving, sock_uri
from test_log_hygiene import _forms

import vrpc
from services.echo import EchoImpl
from services.keyvault.impl import KeyVaultImpl
from services.keyvault.interface import KeyType, KeyVault
from vrpc.cli_enclave import _LineReader, read_logs
from vrpc.logforward import MAX_LINE, MAX_STRING, LogForwarder, encode_line, redact

ROOT = Path(__file__).resolve().parent.parent


class Colour(enum.Enum):
    RED = 1


class Holder:
    def __repr__(self) -> str:
        return f"Holder({MARKER!r})"

    def __str__(self) -> str:
        return MARKER.decode()


def test_redact_keeps_scalars_and_hides_what_could_carry_a_secret() -> None:
    key = bytes(range(32))
    event = {
        "event": "x",
        "n": 3,
        "ok": True,
        "ratio": 0.5,
        "none": None,
        "raw": key,
        "view": memoryview(key),
        "colour": Colour.RED,
        "session_secret": "hunter2",
        "nested": {"Private_Key": "abc", "ids": ["k1", key], "deep": {"a": {"b": {"c": 1}}}},
        "obj": Holder(),
        "long": "y" * (MAX_STRING + 10),
    }
    original = dict(event)
    out = redact(event)
    assert event == original  # the local renderer still gets the event as it was
    assert out["n"] == 3 and out["ok"] is True and out["ratio"] == 0.5 and out["none"] is None
    assert out["raw"] == out["view"] == "<32 bytes>"
    assert out["colour"] == "RED"
    assert out["session_secret"] == "<redacted>"
    assert out["nested"]["Private_Key"] == "<redacted>"
    assert out["nested"]["ids"] == ["k1", "<32 bytes>"]
    assert out["nested"]["deep"]["a"]["b"] == "<dict>"  # depth bound
    assert out["obj"] == "<Holder>"
    assert len(out["long"]) < MAX_STRING + 20 and out["long"].endswith("[truncated]")
    text = json.dumps(out)
    assert not any(form in text for form in _forms(key))
    assert "hunter2" not in text and "VRPC-PLAINTEXT-MARKER" not in text


def test_an_overlong_line_becomes_a_note() -> None:
    event = {"event": "big", **{f"k{i}": "z" * (MAX_STRING - 1) for i in range(40)}}
    line = encode_line(event)
    assert len(line) <= MAX_LINE
    assert json.loads(line) == {"event": "log line too long", "original_event": "big"}


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _forwarding_logger(forwarder: LogForwarder) -> Any:
    return structlog.wrap_logger(
        structlog.ReturnLogger(), processors=[structlog.processors.add_log_level, forwarder]
    )


async def _collect(uri: str, printed: list[str], count: int, word: str = "") -> None:
    reader = asyncio.create_task(read_logs(uri, printed.append, retry=0.02))
    try:
        deadline = time.monotonic() + 10
        while len(printed) < count or word not in "".join(printed):
            assert time.monotonic() < deadline, printed
            await asyncio.sleep(0.01)
    finally:
        reader.cancel()


async def test_lines_wait_for_the_reader_and_the_oldest_are_dropped_beyond_the_bound(
    tmp_path: Path,
) -> None:
    uri = sock_uri(tmp_path, "logs")
    forwarder = LogForwarder(uri, max_buffered=3)
    logger = _forwarding_logger(forwarder)
    for i in range(5):
        logger.info("step", i=i)
    await forwarder.start()
    printed: list[str] = []
    reader = asyncio.create_task(read_logs(uri, printed.append, retry=0.02))
    try:
        await _until(lambda: len(printed) == 4)
        logger.info("after", i=5)
        await _until(lambda: len(printed) == 5)
    finally:
        reader.cancel()
        await forwarder.close()
    events = [json.loads(line) for line in printed]
    assert events[0] == {"event": "log lines dropped", "count": 2}
    assert [e["i"] for e in events[1:]] == [2, 3, 4, 5]


async def test_events_from_other_threads_are_forwarded(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path, "logs")
    forwarder = LogForwarder(uri)
    logger = _forwarding_logger(forwarder)
    await forwarder.start()
    printed: list[str] = []
    try:
        reader = asyncio.create_task(read_logs(uri, printed.append, retry=0.02))
        await asyncio.sleep(0.1)
        thread = threading.Thread(target=lambda: logger.info("from a thread"))
        thread.start()
        thread.join()
        deadline = time.monotonic() + 10
        while not printed:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        reader.cancel()
    finally:
        await forwarder.close()
    assert json.loads(printed[0])["event"] == "from a thread"


async def test_a_new_reader_replaces_the_previous_one(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path, "logs")
    forwarder = LogForwarder(uri)
    await forwarder.start()
    try:
        first_r, first_w = await asyncio.open_unix_connection(uri.removeprefix("unix://"))
        await asyncio.sleep(0.05)
        second_r, second_w = await asyncio.open_unix_connection(uri.removeprefix("unix://"))
        assert await asyncio.wait_for(first_r.read(), 5) == b""  # closed by the enclave
        _forwarding_logger(forwarder).info("to the newest")
        line = await asyncio.wait_for(second_r.readline(), 5)
        assert json.loads(line) == {"event": "to the newest", "level": "info"}
        first_w.close()
        second_w.close()
    finally:
        await forwarder.close()


async def test_the_reader_rejects_what_is_not_one_json_object_per_line() -> None:
    printed: list[str] = []
    reader = _LineReader(printed.append)
    with structlog.testing.capture_logs() as logs:
        reader.data_received(b'{"event": "a"}\nnot json\n[1, 2]\n')
        reader.data_received(b'{"event": "' + b"x" * (MAX_LINE + 10))  # no newline yet
        reader.data_received(b'still the long line"}\n{"event": "b\\u0007"}\n')
    assert [json.loads(p) for p in printed] == [{"event": "a"}, {"event": "b\x07"}]
    assert all("\x07" not in p for p in printed)  # control characters stay escaped
    assert reader.rejected == 3
    assert [e["reason"] for e in logs] == ["not a JSON object", "not a JSON object", "too long"]


@pytest.fixture
def _forwarding_config() -> Iterator[Callable[[LogForwarder], None]]:
    was_configured = structlog.is_configured()
    saved = structlog.get_config()

    def configure(forwarder: LogForwarder) -> None:
        # As `vrpc serve --log-forward` configures it, at every level.
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                forwarder,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(0),
            logger_factory=lambda *_: structlog.ReturnLogger(),
            cache_logger_on_first_use=False,
        )

    yield configure
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


async def test_no_secret_reaches_the_forwarded_logs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    _forwarding_config: Callable[[LogForwarder], None],
) -> None:
    from vrpc.attestation import _document

    monkeypatch.setattr(_document, "_warned_roots", set())
    monkeypatch.setattr(attester(), "_warned", False)
    logs_uri = sock_uri(tmp_path, "logs")
    forwarder = LogForwarder(logs_uri)
    _forwarding_config(forwarder)
    await forwarder.start()
    printed: list[str] = []
    reader = asyncio.create_task(read_logs(logs_uri, printed.append, retry=0.02))
    uri = sock_uri(tmp_path)
    vault = KeyVaultImpl()
    secrets: dict[str, bytes] = {"payload": MARKER}
    try:
        async with serving(uri, [vault, EchoImpl()], log_calls=True), client(uri) as c:
            kv = c.stub(KeyVault)
            signing = await kv.create_key(KeyType.ED25519, "forward-sign")
            aead = await kv.create_key(KeyType.AES_256_GCM, "forward-aead")
            signature = await kv.sign(signing.key_id, MARKER)
            ciphertext = await kv.encrypt(aead.key_id, MARKER, b"ad")
            with pytest.raises(vrpc.RpcError):
                await kv.decrypt(aead.key_id, ciphertext, b"wrong ad")
            with pytest.raises(vrpc.RpcError):  # payload as a method name
                await c.call(MARKER.decode(), [MARKER])
            proto: Any = c._proto
            secrets["session secret"] = proto.endpoint.session._send_secret
            for key in vault._keys.values():
                secrets[f"key material {key.info.key_type}"] = key.material
            secrets["signature"] = signature
            # An application that logs carelessly: the forwarded form still hides the values.
            app = structlog.get_logger("app")
            app.info("debug dump", data=key.material, private_key=MARKER.decode())
            app.info("object", key=Ed25519PrivateKey.generate(), holder=Holder())
        deadline = time.monotonic() + 10
        while not any('"debug dump"' in line for line in printed):
            assert time.monotonic() < deadline, "the forwarded logs did not arrive"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the last lines
    finally:
        reader.cancel()
        await forwarder.close()
    text = "\n".join(printed)
    events = [json.loads(line) for line in printed]
    assert len(events) > 10, "nothing was forwarded: the scan would prove nothing"
    assert any(e["event"] == "call" and e.get("method") == "keyvault.v1.sign" for e in events)
    dump = next(e for e in events if e["event"] == "debug dump")
    assert dump["data"] == f"<{len(key.material)} bytes>" and dump["private_key"] == "<redacted>"
    for name, secret in secrets.items():
        leaked = [form for form in _forms(secret) if form in text]
        assert not leaked, f"{name} appears in the forwarded logs"
    assert "VRPC-PLAINTEXT-MARKER" not in text


def test_vrpc_serve_log_forward_serves_the_servers_events(tmp_path: Path) -> None:
    listen = sock_uri(tmp_path, "echo")
    logs = sock_uri(tmp_path, "logs")
    env = {**os.environ, "VRPC_INSECURE_TEST_ATTESTATION": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vrpc", "serve", "services.echo:EchoImpl", "--listen", listen]
    cmd += ["--insecure-test-attester", "--log-forward", logs]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    printed: list[str] = []
    try:
        asyncio.run(_collect(logs, printed, 1, '"event":"listening"'))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            assert proc.stderr is not None
            proc.stderr.close()
    events = [json.loads(line) for line in printed]
    listening = next(e for e in events if e["event"] == "listening")
    assert listening["level"] == "info" and listening["address"] == listen
    assert "timestamp" in listening


async def test_the_reader_reports_an_enclave_clock_far_from_the_parents() -> None:
    printed: list[str] = []
    reader = _LineReader(printed.append)
    now = datetime.datetime.now(datetime.UTC)
    with structlog.testing.capture_logs() as logs:
        for offset in (0, 5, -3600, -3600, 7200):
            stamp = (now + datetime.timedelta(seconds=offset)).isoformat().replace("+00:00", "Z")
            reader.data_received(json.dumps({"event": "e", "timestamp": stamp}).encode() + b"\n")
        reader.data_received(b'{"event": "e", "timestamp": "not a time"}\n')
        reader.data_received(b'{"event": "e", "timestamp": "2001-01-01T00:00:00"}\n')  # no zone
    assert len(printed) == 7  # every line is printed either way
    warnings = [e for e in logs if "clock" in e["event"]]
    assert len(warnings) == 1  # once: not at every line
    assert -3700 < warnings[0]["skew_seconds"] < -3500


async def test_the_reader_reconnects_when_the_stream_closes(tmp_path: Path) -> None:
    uri = sock_uri(tmp_path, "logs")
    printed: list[str] = []
    reader = asyncio.create_task(read_logs(uri, printed.append, retry=0.02))
    try:
        for boot in (1, 2):  # an enclave restart: a new listener at the same address
            forwarder = LogForwarder(uri)
            await forwarder.start()
            _forwarding_logger(forwarder).info("booted", boot=boot)
            await _until(lambda boot=boot: len(printed) == boot)  # type: ignore[misc]
            await forwarder.close()
    finally:
        reader.cancel()
    assert [json.loads(line)["boot"] for line in printed] == [1, 2]
