"""Resource attacks against a local vrpc server on a Unix socket; prints what each one cost.

    .venv/bin/python -m benchmarks.attacks            # every attack (~30 s)
    .venv/bin/python -m benchmarks.attacks trickle    # one of them

Each attack gets a fresh server in a subprocess (the insecure test attester, behind a 50 ms
blocking delay in a thread like /dev/nsm), so the server's peak RSS (VmHWM) belongs to that
attack alone. An honest client calls echo in a loop alongside; its latency during the attack is
printed with the time the server took to close the attacker and the growth of its peak RSS.
The figures in docs/reliability.md come from this script.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hostile_helpers import (  # noqa: E402
    HonestProbe,
    RawSession,
    client_hello,
    empty_data_record,
    key_update_record,
    read_until_closed,
    sock_path,
)

MiB = 1024 * 1024

_SERVER = """
import asyncio, json, sys
sys.path.insert(0, {tests!r})
import vrpc
from hostile_helpers import EchoImpl, HoldImpl, SlowAttester

async def main():
    services = [EchoImpl(), HoldImpl()]  # hold.v1.hold keeps its arguments until shutdown
    server = vrpc.Server(services, attester=SlowAttester(0.05), **json.loads(sys.argv[2]))
    await server.start(sys.argv[1])
    print("ready", flush=True)
    await server.serve(handle_signals=False)

asyncio.run(main())
"""


class ServerProcess:
    def __init__(self, uri: str, options: dict[str, Any]) -> None:
        env = dict(os.environ, VRPC_INSECURE_TEST_ATTESTATION="1")
        code = _SERVER.format(tests=str(ROOT / "tests"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, uri, json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        for _ in range(100):  # the server's log lines come first
            line = self.proc.stdout.readline()
            if line.strip() == b"ready" or not line:
                break
        if line.strip() != b"ready":
            raise RuntimeError("the server did not start")
        # Its log goes on to the pipe: drain it so the server never blocks on a full pipe.
        import threading

        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def peak_rss(self) -> int:
        return self._status("VmHWM:")

    def rss(self) -> int:
        return self._status("VmRSS:")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    return await read_until_closed(reader, timeout=60.0, reads=100_000)


# -- the attacks: each calls begin() when the attack proper starts, and returns a note and the
# seconds until the server closed the attacker ------------------------------------------------


async def tiny_records(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """200 hellos announcing max_record=1 (it used to serve them: 22x wire amplification)."""
    begin()  # the attacker's own preparation (same process) is not the honest client's wait
    started = time.perf_counter()
    refused = 0
    for _ in range(200):
        reader, writer = await asyncio.open_unix_connection(sock_path(uri))
        writer.write(client_hello(max_record=1))
        refused += len(await _until_closed(reader)) == 6  # one ALERT
        writer.close()
    took = (time.perf_counter() - started) / 200
    return f"{refused}/200 refused with an ALERT", took


async def bytes_while_attesting(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """A valid hello, then 64 MiB while the server attests."""
    reader, writer = await asyncio.open_unix_connection(sock_path(uri))
    writer.write(client_hello())
    await asyncio.sleep(0.01)
    begin()  # the attacker's own preparation (same process) is not the honest client's wait
    started = time.perf_counter()
    sent = 0
    try:
        for _ in range(256):
            writer.write(bytes(256 * 1024))
            await asyncio.wait_for(writer.drain(), 10)
            sent += 256 * 1024
    except (ConnectionResetError, BrokenPipeError):
        pass
    await _until_closed(reader)
    return f"{sent / MiB:.1f} of 64 MiB accepted by the socket", time.perf_counter() - started


async def _record_flood(
    uri: str, begin: Callable[[], None], record: Callable[[Any], bytes], count: int
) -> tuple[str, float]:
    """``count`` records made by ``record`` after a handshake, sent back to back."""
    raw = await RawSession.open(uri)
    flood = b"".join(record(raw.session) for _ in range(count))
    begin()  # the attacker's own preparation (same process) is not the honest client's wait
    started = time.perf_counter()
    try:
        raw.send_wire(flood)
        closed = await raw.closed_by_server(30)
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    return f"closed={closed}", time.perf_counter() - started


async def empty_records(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """100,000 empty DATA records after a handshake."""
    return await _record_flood(uri, begin, empty_data_record, 100_000)


async def key_updates(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """20,000 back-to-back KEY_UPDATE records."""
    return await _record_flood(uri, begin, key_update_record, 20_000)


async def _gone(raw: RawSession) -> bool:
    """The server closed this attacker (read what is there without waiting)."""
    if raw.reader.at_eof():
        return True
    try:
        await asyncio.wait_for(raw.reader.read(65536), 0.01)
    except TimeoutError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    return raw.reader.at_eof()


async def trickle(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """20 connections announce a ~4 MiB frame, send all but a little, then a byte a second."""
    raws = [await RawSession.open(uri) for _ in range(20)]
    size = 4 * MiB
    begin()
    started = time.perf_counter()
    for raw in raws:
        raw.send_plain(size.to_bytes(4, "big") + bytes(size - 100))
    closed = 0
    for _ in range(120):  # at most 120 s
        await asyncio.sleep(1.0)
        closed = 0
        for raw in raws:
            if await _gone(raw):
                closed += 1
            elif not raw.writer.is_closing():
                try:
                    raw.send_plain(b"\x00")  # activity, never completion
                except (ConnectionResetError, BrokenPipeError):
                    pass
        if closed == len(raws):
            break
    return f"{closed}/20 closed", time.perf_counter() - started


async def budget(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """24 connections park a ~4 MiB partial frame each (96 MiB) against a 64 MiB budget."""
    raws = [await RawSession.open(uri) for _ in range(24)]
    size = 4 * MiB
    begin()
    started = time.perf_counter()
    for raw in raws:
        raw.send_plain(size.to_bytes(4, "big") + bytes(size - 100))
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.0)
    shed = [await _gone(raw) for raw in raws]
    return f"{sum(shed)}/24 shed", time.perf_counter() - started


async def slow_calls(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """300 calls with 1 MiB arguments to a handler that waits (as on a KMS call or a lock)."""
    raw = await RawSession.open(uri)
    data = bytes(MiB)
    begin()
    started = time.perf_counter()
    for _ in range(300):
        raw.call("hold.v1.hold", [data])
        await raw.writer.drain()
    refused = 0
    for _ in range(300):  # the refusals come back as they are decided; the held calls never do
        try:
            refused += len(await raw.events(timeout=2.0))
        except TimeoutError:
            break
    took = time.perf_counter() - started
    return f"{300 - refused} held, {refused} refused (RESOURCE_EXHAUSTED)", took


async def idle_connections(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """200 established sessions that send nothing: what one connection costs at rest."""
    begin()
    started = time.perf_counter()
    raws = [await RawSession.open(uri) for _ in range(200)]
    await asyncio.sleep(0.5)
    return f"{len(raws)} sessions held", time.perf_counter() - started


async def hello_flood(uri: str, begin: Callable[[], None]) -> tuple[str, float]:
    """One fixed hello replayed on 200 connections at a time for 3 s."""
    hello = client_hello()
    counts = {"refused": 0, "attested": 0}
    stop = time.perf_counter() + 3.0

    async def replay() -> None:
        while time.perf_counter() < stop:
            reader, writer = await asyncio.open_unix_connection(sock_path(uri))
            try:
                writer.write(hello)
                first = await asyncio.wait_for(reader.read(65536), 15)
            except (ConnectionResetError, BrokenPipeError):
                first = b""  # refused and closed before our hello was written
            writer.close()
            counts["attested" if len(first) > 6 else "refused"] += 1

    begin()  # the attacker's own preparation (same process) is not the honest client's wait
    started = time.perf_counter()
    await asyncio.gather(*(replay() for _ in range(200)))
    took = time.perf_counter() - started
    return f"{counts['attested']} attested, {counts['refused']} refused (HANDSHAKE_LIMIT)", took


Attack = Callable[[str, Callable[[], None]], Awaitable[tuple[str, float]]]
ATTACKS: dict[str, tuple[Attack, dict[str, Any]]] = {
    "tiny-records": (tiny_records, {}),
    "bytes-while-attesting": (bytes_while_attesting, {}),
    "empty-records": (empty_records, {}),
    "key-updates": (key_updates, {}),
    "trickle": (trickle, {"message_timeout": 5.0}),
    "budget": (budget, {"max_buffered": 64 * MiB}),
    "hello-flood": (hello_flood, {}),
    "idle-connections": (idle_connections, {}),
    "slow-calls": (slow_calls, {}),
    "slow-calls-unbounded": (slow_calls, {"max_in_flight_bytes": None}),
}


async def run(name: str, tmp: str) -> None:
    attack, options = ATTACKS[name]
    uri = f"unix://{tmp}/{name}.sock"
    server = ServerProcess(uri, options)
    try:
        async with HonestProbe(uri) as honest:
            await asyncio.sleep(0.2)
            base_rss = server.rss()
            base = [len(honest.latencies)]

            def begin() -> None:
                # Skip the call in flight now: the attacker's preparation in this process
                # (building 100,000 records) delayed it, not the server.
                base[0] = len(honest.latencies) + 1

            note, took = await attack(uri, begin)
            await asyncio.sleep(0.2)  # and the calls just after it
            during = sorted(honest.latencies[base[0] :]) or [float("nan")]
        await RawSession.close_all()
        grown = (server.peak_rss() - base_rss) / MiB
        p50 = during[len(during) // 2] * 1000
        worst = during[-1] * 1000
        errors = len(honest.errors)
        print(
            f"{name:22} {note:44} close {took * 1000:9.1f} ms  peak RSS +{grown:6.1f} MiB  "
            f"honest p50 {p50:6.2f} ms max {worst:7.2f} ms ({len(during)} calls, "
            f"{errors} errors)  options={options}",
            flush=True,
        )
    finally:
        server.stop()


async def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(ATTACKS):
            await run(name, tmp)


if __name__ == "__main__":
    os.environ["VRPC_INSECURE_TEST_ATTESTATION"] = "1"
    asyncio.run(main(sys.argv[1:]))
