"""One side of a benchmark, in its own process, driven by the suite over its stdin and stdout.

::

    python -m benchmarks.worker server SYSTEM LOOP ADDRESS [--profile OUT] [--tracemalloc]
    python -m benchmarks.worker client SYSTEM LOOP ADDRESS [--profile OUT]
    python -m benchmarks.worker verify SPEC_JSON OUT_JSON

Servers and clients stay up for the whole suite so that repetitions of different systems can be
interleaved. Each reads one JSON command per line on stdin and answers with one JSON line on a
private copy of stdout (the process's own stdout is pointed at stderr, so a stray print or log
line cannot corrupt the exchange); end of input ends the process. The first line a worker writes
is ``{"ready": ...}``.

Server commands: ``cpu`` (the process's CPU time), ``mem`` (Python heap traced by tracemalloc
and RSS, after a garbage collection), ``reset_peak`` (tracemalloc's and the kernel's peak
trackers). Client commands: ``run`` (one timed run of a case), ``open`` (more idle connections),
``echo`` (one call of a given size).

CPU time is ``time.process_time()`` read inside each process (CLOCK_PROCESS_CPUTIME_ID: user +
system of every thread, nanosecond resolution). The suite asks the server between runs only, so
a measurement never interrupts the server while it is being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

SYSTEMS = ("vrpc", "vrpc-plaintext", "raw-echo", "byte-echo", "grpc-aio", "blocking-echo")
# vrpc (and services) of another revision, with this revision's harness: an A/B in one run.
BASELINE = "vrpc-baseline"
VECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "vectors"
VERIFY_VECTOR = "blocky_nitro_attestation.cbor"


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


def system_module(system: str) -> Any:
    if system in ("vrpc", "vrpc-plaintext", BASELINE):
        _quiet()
        from benchmarks import vrpc_echo

        return vrpc_echo
    if system == "raw-echo":
        from benchmarks import raw_echo

        return raw_echo
    if system == "byte-echo":
        from benchmarks import byte_echo

        return byte_echo
    if system == "grpc-aio":
        from benchmarks import grpc_aio

        return grpc_aio
    raise ValueError(f"unknown system {system!r}")


# ------------------------------------------------------------------------------ the channel


class Channel:
    """Answers go to a private copy of stdout; fd 1 itself is pointed at stderr."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self.out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()


class AsyncLines:
    """JSON commands from stdin, read by the running event loop (no thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.buf = b""
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        os.set_blocking(0, False)
        self.loop.add_reader(0, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(0)
            self.queue.put_nowait(None)
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.queue.put_nowait(json.loads(line))

    async def get(self) -> dict[str, Any] | None:
        return await self.queue.get()


# ---------------------------------------------------------------------------------- server


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def server_command(cmd: dict[str, Any]) -> dict[str, Any]:
    import tracemalloc

    op = cmd.get("op")
    if op == "cpu":
        return {"cpu_s": time.process_time()}
    if op == "mem":
        gc.collect()
        traced, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
        return {
            "tracing": tracemalloc.is_tracing(),
            "traced": traced,
            "traced_peak": peak,
            "rss": _proc_status_bytes("VmRSS"),
            "hwm": _proc_status_bytes("VmHWM"),
        }
    if op == "reset_peak":
        gc.collect()
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()
        try:
            # "5" resets the kernel's peak RSS (VmHWM) of this process to its current RSS.
            Path("/proc/self/clear_refs").write_text("5")
            hwm_reset = True
        except OSError:
            hwm_reset = False
        return {"hwm_reset": hwm_reset}
    return {"error": f"unknown server command {op!r}"}


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


def run_server(system: str, loop: str, address: str, channel: Channel) -> None:
    if system == "blocking-echo":
        _blocking_server(address, channel)
        return
    module = system_module(system)

    async def main() -> None:
        lines = AsyncLines()
        close = await module.start_server(address)
        channel.send({"ready": os.getpid()})
        try:
            while (cmd := await lines.get()) is not None:
                channel.send(server_command(cmd))
        finally:
            await close()

    _run(loop, main())


def _blocking_server(address: str, channel: Channel) -> None:
    from benchmarks._base import unix_path
    from benchmarks.blocking_echo import serve_forever

    path = unix_path(address)
    if path is None:
        raise ValueError(f"blocking-echo runs over Unix sockets only, not {address}")
    listening = threading.Event()
    thread = threading.Thread(
        target=serve_forever, args=(path, listening.set), daemon=True, name="blocking-echo"
    )
    thread.start()
    if not listening.wait(20):
        raise RuntimeError("blocking-echo: the server did not start")
    channel.send({"ready": os.getpid()})
    # The serving thread blocks in accept/recv: commands are answered by this thread meanwhile.
    for line in sys.stdin:
        channel.send(server_command(json.loads(line)))


# ---------------------------------------------------------------------------------- client


def summary(
    calls: int, elapsed: float, latencies: list[int] | None, client_cpu: float
) -> dict[str, Any]:
    """One run's figures (server CPU is added by the suite, which asks the server)."""
    lat = sorted(latencies) if latencies else []
    n = len(lat)
    return {
        "calls": calls,
        "elapsed_s": elapsed,
        "calls_per_s": calls / elapsed if elapsed > 0 else 0.0,
        "p50_us": lat[n // 2] / 1000 if n else None,
        "p99_us": lat[min(n - 1, (n * 99) // 100)] / 1000 if n else None,
        "client_cpu_us_per_call": client_cpu * 1e6 / calls if calls else None,
    }


async def _timed(
    duration: float,
    concurrency: int,
    op: Callable[[], Awaitable[Any]],
    items_per_op: int = 1,
    *,
    op_times_itself: bool = False,
) -> tuple[int, float, list[int]]:
    """Run ``op`` back to back on ``concurrency`` workers for ``duration`` seconds; the latency
    of each run is its whole duration, or (``op_times_itself``) the nanoseconds ``op`` returns."""
    latencies: list[int] = []
    stopped = False

    def finish() -> None:
        nonlocal stopped
        stopped = True

    async def worker() -> None:
        clock = time.perf_counter_ns
        append = latencies.append
        if op_times_itself:
            while not stopped:
                append(await op())
            return
        while not stopped:
            t0 = clock()
            await op()
            append(clock() - t0)

    t0 = time.perf_counter()
    handle = asyncio.get_running_loop().call_later(duration, finish)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    handle.cancel()
    return len(latencies) * items_per_op, time.perf_counter() - t0, latencies


class AsyncClient:
    def __init__(self, system: str, address: str) -> None:
        self.system = system
        self.address = address
        self.module = system_module(system)
        self.kwargs = {"plaintext": True} if system == "vrpc-plaintext" else {}
        self.extra: list[Any] = []
        self.checked: set[int] = set()
        self.client: Any = None

    async def open(self) -> Any:
        return await self.module.open_client(self.address, **self.kwargs)

    async def run(self, case: dict[str, Any], duration: float) -> dict[str, Any]:
        kind, size, conc = case["case"], case["payload_bytes"], case["concurrency"]
        client = self.client
        cpu0 = time.process_time()
        if kind == "unary":
            payload = os.urandom(size)
            if size not in self.checked:
                if bytes(await client.echo(payload)) != payload:
                    raise AssertionError(f"{self.system}: the echo came back different")
                self.checked.add(size)
                cpu0 = time.process_time()
            if hasattr(client, "pump"):
                calls, elapsed = await client.pump(payload, conc, duration)
                return summary(calls, elapsed, None, time.process_time() - cpu0)
            echo = client.echo
            calls, elapsed, lat = await _timed(duration, conc, lambda: echo(payload))
        elif kind == "server-stream":
            count = case["items"]
            stream = client.stream
            calls, elapsed, lat = await _timed(duration, conc, lambda: stream(size, count), count)
        elif kind == "handshake":
            clock = time.perf_counter_ns

            # The latency is the handshake: from connecting until the session can carry calls.
            # Closing (which waits for the server's CLOSE) is left out of it, not out of calls/s.
            async def handshake() -> int:
                t0 = clock()
                fresh = await self.open()
                opened = clock() - t0
                await fresh.close()
                return opened

            calls, elapsed, lat = await _timed(duration, conc, handshake, op_times_itself=True)
        else:
            raise ValueError(f"unknown case {kind!r}")
        return summary(calls, elapsed, lat, time.process_time() - cpu0)

    async def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "run":
            return await self.run(cmd["case"], cmd["duration"])
        if op == "open":
            for _ in range(cmd["count"]):
                fresh = await self.open()
                await fresh.echo(b"x" * 64)
                self.extra.append(fresh)
            return {"open": len(self.extra) + 1}
        if op == "echo":
            payload = os.urandom(cmd["size"])
            ok = bytes(await self.client.echo(payload)) == payload
            return {"ok": ok}
        return {"error": f"unknown client command {op!r}"}

    async def close(self) -> None:
        for fresh in self.extra:
            await fresh.close()
        if self.client is not None:
            await self.client.close()


def run_client(system: str, loop: str, address: str, channel: Channel) -> None:
    if system == "blocking-echo":
        _blocking_client(address, channel)
        return

    async def main() -> None:
        lines = AsyncLines()
        client = AsyncClient(system, address)
        client.client = await client.open()
        channel.send({"ready": os.getpid()})
        try:
            while (cmd := await lines.get()) is not None:
                channel.send(await client.command(cmd))
        finally:
            await client.close()

    _run(loop, main())


def _blocking_client(address: str, channel: Channel) -> None:
    from benchmarks._base import unix_path
    from benchmarks.blocking_echo import BlockingClient

    path = unix_path(address)
    if path is None:
        raise ValueError(f"blocking-echo runs over Unix sockets only, not {address}")
    client = BlockingClient(path)
    channel.send({"ready": os.getpid()})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("op") != "run" or cmd["case"]["case"] != "unary":
                channel.send({"error": f"blocking-echo: unsupported command {cmd}"})
                continue
            payload = os.urandom(cmd["case"]["payload_bytes"])
            if bytes(client.echo(payload)) != payload:
                raise AssertionError("blocking-echo: the echo came back different")
            latencies: list[int] = []
            clock = time.perf_counter_ns
            echo = client.echo
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            end = t0 + cmd["duration"]
            while time.perf_counter() < end:
                t = clock()
                echo(payload)
                latencies.append(clock() - t)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            channel.send(summary(len(latencies), elapsed, latencies, cpu))
    finally:
        client.close()


# ---------------------------------------------------------------------------------- verify


def run_verify(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """``verify_document`` on a recorded Nitro document at its own timestamp (AWS root): one
    run per repetition; the CPU figure is this process's own."""
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
    for i in range(spec["reps"] + 1):
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
        if i:
            run = summary(len(latencies), elapsed, latencies, cpu)
            # No server: the server column is the verifying process's own CPU.
            run["server_cpu_us_per_call"] = run.pop("client_cpu_us_per_call")
            run["client_cpu_us_per_call"] = None
            runs.append(run)
    return [
        {
            "case": {"case": "verify", "payload_bytes": len(document), "concurrency": 1},
            "runs": runs,
            "note": f"{VERIFY_VECTOR} at its own timestamp; CPU column is the verifier's own",
        }
    ]


# ------------------------------------------------------------------------------------ main


def main(argv: list[str]) -> int:
    if argv[:1] == ["verify"]:
        spec = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(run_verify(spec)))
        return 0
    if len(argv) < 4 or argv[0] not in ("server", "client"):
        raise SystemExit(
            f"usage: python -m benchmarks.worker server|client SYSTEM LOOP ADDRESS: {argv}"
        )
    role, system, loop, address = argv[:4]
    options = argv[4:]
    if "--vrpc-from" in options:
        # Before anything imports vrpc: the other revision's vrpc/ and services/ shadow these.
        sys.path.insert(0, options[options.index("--vrpc-from") + 1])
    profile_out = options[options.index("--profile") + 1] if "--profile" in options else None
    if "--tracemalloc" in options:
        import tracemalloc

        tracemalloc.start()
    channel = Channel()
    with profiled(profile_out):
        if role == "server":
            run_server(system, loop, address, channel)
        else:
            run_client(system, loop, address, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
