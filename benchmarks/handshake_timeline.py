"""Where a handshake's wall time goes: both processes' steps on one clock.

The vrpc echo server runs in a child process and the client here; in both, the shell's callbacks
(``connection_made``, ``data_received``, ``flush``, ``connection_lost``) are wrapped to record when
each ran and for how long. ``time.perf_counter`` is CLOCK_MONOTONIC on Linux, the same clock in
both processes, so the steps of one connect-and-close cycle line up. Prints, for the steps seen in
most cycles, the median start (from the moment the client began to connect) and duration::

    python -m benchmarks.handshake_timeline [--rounds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vrpc import _shell

STEPS = ("connection_made", "data_received", "flush", "connection_lost")
_log: list[tuple[str, float, float]] = []


def instrument() -> None:
    """Record every call of the shell's callbacks in this process."""
    clock = time.perf_counter
    for name in STEPS:
        original = getattr(_shell.EndpointProtocol, name)

        def timed(self: Any, *args: Any, _original: Any = original, _name: str = name) -> Any:
            started = clock()
            try:
                return _original(self, *args)
            finally:
                _log.append((_name, started, clock()))

        setattr(_shell.EndpointProtocol, name, timed)


async def _serve(address: str, log_path: str) -> None:
    from benchmarks.vrpc_echo import start_server

    close = await start_server(address)
    print("ready", flush=True)
    # Until the parent closes our stdin: then write what was recorded.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await close()


def _serve_and_log(address: str, log_path: str) -> None:
    import uvloop

    uvloop.run(_serve(address, log_path))
    Path(log_path).write_text(json.dumps(_log))


async def _drive(address: str, rounds: int) -> list[tuple[float, float, float]]:
    from benchmarks.vrpc_echo import make_client, quiet_logs

    quiet_logs()
    marks = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        client = make_client(address, plaintext=False)
        await client.connect()
        t1 = time.perf_counter()
        await client.close()
        marks.append((t0, t1, time.perf_counter()))
    return marks


def summarize(
    client_log: list[Any], server_log: list[Any], marks: list[Any], warmup: int
) -> list[tuple[str, int, float, float]]:
    """(step, cycles it was seen in, median start µs, median duration µs) in order of start."""
    steps = [("client " + n, a, b) for n, a, b in client_log]
    steps += [("server " + n, a, b) for n, a, b in server_log]
    steps.sort(key=lambda s: s[1])
    seen: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for t0, _, t2 in marks[warmup:]:
        cycle = [s for s in steps if t0 <= s[1] <= t2]
        for i, (name, a, b) in enumerate(cycle):
            seen.setdefault((i, name), []).append(((a - t0) * 1e6, (b - a) * 1e6))
    cycles = len(marks) - warmup
    rows = [
        (
            name,
            len(v),
            statistics.median(x[0] for x in v),
            statistics.median(x[1] for x in v),
        )
        for (_, name), v in seen.items()
        if len(v) >= cycles // 2
    ]
    rows.sort(key=lambda r: r[2])
    opened = statistics.median((t1 - t0) * 1e6 for t0, t1, _ in marks[warmup:])
    closed = statistics.median((t2 - t0) * 1e6 for t0, _, t2 in marks[warmup:])
    rows.append(("client: connect() returned (session ready)", cycles, opened, 0.0))
    rows.append(("client: close() returned", cycles, closed, 0.0))
    rows.sort(key=lambda r: r[2])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handshake_timeline")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--serve", nargs=2, metavar=("ADDRESS", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("VRPC_INSECURE_TEST_ATTESTATION", "1")
    instrument()
    import uvloop

    if args.serve:
        _serve_and_log(*args.serve)
        return
    warmup = min(50, args.rounds // 5)
    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix://{tmp}/hs.sock"
        server_log = Path(tmp) / "server.json"
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.handshake_timeline",
                "--serve",
                address,
                str(server_log),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            marks = uvloop.run(_drive(address, args.rounds))
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=30)
        server = json.loads(server_log.read_text())
    print(f"{'step':48s} {'cycles':>6s} {'start µs':>9s} {'took µs':>8s}")
    for name, count, start, took in summarize(_log, server, marks, warmup):
        print(f"{name:48s} {count:6d} {start:9.0f} {took:8.0f}")


if __name__ == "__main__":
    main()
