"""One side of a benchmark, in its own process: ``server`` or ``client`` (or ``verify``).

::

    python -m benchmarks.worker server SYSTEM LOOP SOCKET READYFILE [PROFILE_OUT]
    python -m benchmarks.worker client SYSTEM LOOP SOCKET SERVER_PID SPEC_JSON OUT_JSON

The client reads the server's CPU time from ``/proc/PID/stat`` around each run, so the server
process is never asked anything while it is being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SYSTEMS = ("vrpc", "vrpc-plaintext", "raw-echo", "grpc-aio", "blocking-echo")
VECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "vectors"
VERIFY_VECTOR = "blocky_nitro_attestation.cbor"
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) from /proc, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def _run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(main)


def _quiet() -> None:
    from benchmarks.vrpc_echo import quiet_logs

    quiet_logs()


def _system_module(system: str) -> Any:
    if system in ("vrpc", "vrpc-plaintext"):
        _quiet()
        from benchmarks import vrpc_echo

        return vrpc_echo
    if system == "raw-echo":
        from benchmarks import raw_echo

        return raw_echo
    if system == "grpc-aio":
        from benchmarks import grpc_aio

        return grpc_aio
    raise ValueError(f"unknown system {system!r}")


# ---------------------------------------------------------------------------------- server


def _write_ready(ready: str) -> None:
    Path(ready).write_text(str(os.getpid()))


@contextlib.contextmanager
def profiled(out: str | None) -> Iterator[None]:
    """Sample the whole process (event loop included) with pyinstrument when ``out`` is set."""
    if not out:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        tree = profiler.output_text(unicode=True, time="percent_of_total", show_all=True)
        Path(out).write_text(tree)
        flat = profiler.output_text(unicode=True, time="percent_of_total", flat=True)
        Path(out + ".flat").write_text(flat)


def run_server(system: str, loop: str, path: str, ready: str, profile_out: str | None) -> None:
    if system == "blocking-echo":
        from benchmarks.blocking_echo import serve_forever

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve_forever(path, lambda: _write_ready(ready))
        return
    module = _system_module(system)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        task = asyncio.create_task(module.serve(path, stop))
        listening = Path(path)
        for _ in range(2000):  # bounded: 20 s
            if listening.exists() or task.done():  # noqa: ASYNC240 (a stat, before any load)
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        Path(ready).write_text(str(os.getpid()))  # noqa: ASYNC240
        await task

    with profiled(profile_out):
        _run(loop, main())


# ---------------------------------------------------------------------------------- client


class Stopwatch:
    """Runs one timed run: calls, elapsed seconds, per-call latencies (ns), server CPU."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.cpu0 = 0.0
        self.client_cpu0 = 0.0
        self.t0 = 0.0

    def start(self) -> None:
        self.cpu0 = process_cpu_seconds(self.server_pid)
        self.client_cpu0 = time.process_time()
        self.t0 = time.perf_counter()

    def stop(self, calls: int, latencies: list[int]) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        client_cpu = time.process_time() - self.client_cpu0
        cpu = process_cpu_seconds(self.server_pid) - self.cpu0
        latencies.sort()
        n = len(latencies)
        return {
            "calls": calls,
            "elapsed_s": elapsed,
            "calls_per_s": calls / elapsed,
            "p50_us": latencies[n // 2] / 1000 if n else None,
            "p99_us": latencies[min(n - 1, (n * 99) // 100)] / 1000 if n else None,
            "server_cpu_us_per_call": cpu * 1e6 / calls if calls else None,
            "client_cpu_us_per_call": client_cpu * 1e6 / calls if calls else None,
        }


async def _timed(
    duration: float, concurrency: int, op: Callable[[], Awaitable[Any]], items_per_op: int = 1
) -> tuple[int, list[int]]:
    latencies: list[int] = []
    stopped = False

    def finish() -> None:
        nonlocal stopped
        stopped = True

    async def worker() -> None:
        clock = time.perf_counter_ns
        append = latencies.append
        while not stopped:
            t0 = clock()
            await op()
            append(clock() - t0)

    handle = asyncio.get_running_loop().call_later(duration, finish)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    handle.cancel()
    return len(latencies) * items_per_op, latencies


def _op_for(case: dict[str, Any], system: str, module: Any, client: Any, path: str) -> Any:
    kind = case["case"]
    size = case["payload_bytes"]
    if kind == "unary":
        payload = os.urandom(size)
        echo = client.echo
        return lambda: echo(payload), 1, payload
    if kind == "server-stream":
        count = case["items"]
        stream = client.stream
        return lambda: stream(size, count), count, None
    if kind == "handshake":
        kwargs = {"plaintext": True} if system == "vrpc-plaintext" else {}

        async def handshake() -> None:
            fresh = await module.open_client(path, **kwargs)
            await fresh.close()

        return handshake, 1, None
    raise ValueError(f"unknown case {kind!r}")


async def _client_main(
    system: str, path: str, server_pid: int, spec: dict[str, Any]
) -> list[dict[str, Any]]:
    module = _system_module(system)
    kwargs = {"plaintext": True} if system == "vrpc-plaintext" else {}
    client = await module.open_client(path, **kwargs)
    rows = []
    try:
        for case in spec["cases"]:
            op, items, payload = _op_for(case, system, module, client, path)
            if payload is not None and bytes(await client.echo(payload)) != payload:
                raise AssertionError(f"{system}: the echo came back different")
            conc = case["concurrency"]
            await _timed(spec["warmup"], conc, op, items)
            runs = []
            for _ in range(case.get("runs", spec["runs"])):
                watch = Stopwatch(server_pid)
                watch.start()
                calls, lat = await _timed(case.get("duration", spec["duration"]), conc, op, items)
                runs.append(watch.stop(calls, lat))
            rows.append(_row(case, runs))
    finally:
        await client.close()
    return rows


def _blocking_client(path: str, server_pid: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.blocking_echo import BlockingClient

    client = BlockingClient(path)
    rows = []
    try:
        for case in spec["cases"]:
            payload = os.urandom(case["payload_bytes"])
            if bytes(client.echo(payload)) != payload:
                raise AssertionError("blocking-echo: the echo came back different")
            runs = []
            for i in range(case.get("runs", spec["runs"]) + 1):
                duration = spec["warmup"] if i == 0 else case.get("duration", spec["duration"])
                watch = Stopwatch(server_pid)
                latencies: list[int] = []
                clock = time.perf_counter_ns
                echo = client.echo
                watch.start()
                end = time.perf_counter() + duration
                while time.perf_counter() < end:
                    t0 = clock()
                    echo(payload)
                    latencies.append(clock() - t0)
                result = watch.stop(len(latencies), latencies)
                if i:
                    runs.append(result)
            rows.append(_row(case, runs))
    finally:
        client.close()
    return rows


def _row(case: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    rates = [r["calls_per_s"] for r in runs]
    calls_per_s = statistics.median(rates)
    return {
        "case": case["case"],
        "payload_bytes": case["payload_bytes"],
        "concurrency": case["concurrency"],
        "calls_per_s": calls_per_s,
        "mb_per_s": calls_per_s * case["payload_bytes"] / 1e6,
        "p50_us": med("p50_us"),
        "p99_us": med("p99_us"),
        "server_cpu_us_per_call": med("server_cpu_us_per_call"),
        "client_cpu_us_per_call": med("client_cpu_us_per_call"),
        "runs": rates,
        "spread": max(rates) / min(rates) if min(rates) > 0 else None,
        "calls": sum(r["calls"] for r in runs),
    }


def run_verify(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """``verify_document`` on a recorded Nitro document at its own timestamp (AWS root)."""
    import cbor2

    from vrpc.attestation import verify_document

    _quiet()
    vector = VECTORS / "attestation" / VERIFY_VECTOR
    if not vector.exists():
        return []
    document = vector.read_bytes()
    payload = cbor2.loads(cbor2.loads(document)[2])
    now = datetime.fromtimestamp(payload["timestamp"] / 1000, UTC)
    verify_document(document, now=now)
    runs = []
    for i in range(spec["runs"] + 1):
        duration = spec["warmup"] if i == 0 else spec["duration"]
        latencies: list[int] = []
        clock = time.perf_counter_ns
        t_start = time.perf_counter()
        cpu0 = time.process_time()
        end = t_start + duration
        while time.perf_counter() < end:
            t0 = clock()
            verify_document(document, now=now)
            latencies.append(clock() - t0)
        elapsed = time.perf_counter() - t_start
        cpu = time.process_time() - cpu0
        latencies.sort()
        n = len(latencies)
        if i:
            runs.append(
                {
                    "calls": n,
                    "calls_per_s": n / elapsed,
                    "p50_us": latencies[n // 2] / 1000,
                    "p99_us": latencies[min(n - 1, (n * 99) // 100)] / 1000,
                    # No server: the CPU column is the verifying process's own.
                    "server_cpu_us_per_call": cpu * 1e6 / n,
                }
            )
    row = _row({"case": "verify", "payload_bytes": len(document), "concurrency": 1}, runs)
    row["mb_per_s"] = None
    row["note"] = f"{VERIFY_VECTOR} at its own timestamp; CPU column is the verifier's own"
    return [row]


def run_client(
    system: str, loop: str, path: str, server_pid: int, spec_file: str, out_file: str
) -> None:
    spec = json.loads(Path(spec_file).read_text())
    rows: list[dict[str, Any]] = []
    if system == "verify":
        rows = run_verify(spec)
    elif system == "blocking-echo":
        rows = _blocking_client(path, server_pid, spec)
    else:

        async def main() -> None:
            rows.extend(await _client_main(system, path, server_pid, spec))

        with profiled(spec.get("profile_out")):
            _run(loop, main())
    Path(out_file).write_text(json.dumps(rows))


def main(argv: list[str]) -> int:
    if argv[0] == "server":
        system, loop, path, ready = argv[1:5]
        run_server(system, loop, path, ready, argv[5] if len(argv) > 5 else None)
    elif argv[0] == "client":
        system, loop, path, pid, spec, out = argv[1:7]
        run_client(system, loop, path, int(pid), spec, out)
    else:
        raise SystemExit(f"usage: python -m benchmarks.worker server|client ...: {argv}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
