"""Soak: ``python -m tests.soak --seconds N`` (``make soak``).

Many concurrent clients against one server on a Unix socket, for N seconds: unary calls, server-
and client-streaming calls, each client reconnecting every few calls. Every acknowledged result is
checked against what was sent. After the run (and a warm-up that fills caches and pools), the
process must be back where it was: no leaked tasks, no leaked file descriptors, bounded RSS
growth. Prints one summary line; exits 1 if any check fails.

Then the load scenarios (``--load-calls``, 0 to skip), each printing one line of figures:

- one client issuing ``--load-calls`` (10,000) calls at once against a per-connection limit a
  tenth of that: every call answered correctly, none refused, the connection kept full; the
  time each call waited in the client's queue (p50/p99) and RSS before/after;
- twice ``max_connections`` clients connecting at once: the excess refused with UNAVAILABLE
  "server at connection limit" (time to refuse p50/max), the rest served;
- a pool over three servers, one stopped with calls in flight and restarted: every call
  accounted for (idempotent ones all succeed; a non-idempotent one fails with UNAVAILABLE only if
  it was running on the stopped server); failover time (stop to the last cut-off idempotent call
  answered elsewhere) and the time until the restarted server serves again.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

os.environ.setdefault("VRPC_INSECURE_TEST_ATTESTATION", "1")

import vrpc
from services.echo import Echo, EchoImpl

RSS_BOUND = 48 * 1024 * 1024
# Memory the fan-out scenario may keep after it ends: the allocator keeps the pools it grew for
# 10,000 calls in flight (about 45 MiB measured).
LOAD_RSS_BOUND = 96 * 1024 * 1024


@dataclass
class Tally:
    unary: int = 0
    stream_items: int = 0
    streams: int = 0
    sinks: int = 0
    connections: int = 0
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _client_loop(
    uri: str, attester: vrpc.InsecureTestAttester, seed: int, stop: float, tally: Tally
) -> None:
    rng = random.Random(seed)
    for _ in range(1_000_000):  # bounded; the clock ends it long before
        if time.monotonic() >= stop:
            return
        async with vrpc.connect(
            uri, policy=attester.policy(), root=attester.trust_root(), timeout=30.0
        ) as c:
            tally.connections += 1
            echo = c.stub(Echo)
            for _ in range(rng.randint(5, 40)):  # then reconnect
                if time.monotonic() >= stop:
                    return
                kind = rng.random()
                try:
                    if kind < 0.7:
                        payload = rng.randbytes(rng.choice((0, 1, 64, 1000, 20_000)))
                        got = await echo.echo(payload)
                        tally.unary += 1
                        tally.mismatches += got != payload
                    elif kind < 0.9:
                        size, count = rng.randint(0, 3000), rng.randint(0, 50)
                        items = [item async for item in echo.stream(size, count)]
                        tally.streams += 1
                        tally.stream_items += len(items)
                        tally.mismatches += items != [b"\x5a" * size] * count
                    else:
                        chunks = [rng.randbytes(rng.randint(0, 5000)) for _ in range(20)]

                        async def gen(chunks: list[bytes] = chunks) -> AsyncIterator[bytes]:
                            for chunk in chunks:
                                yield chunk

                        total = await echo.sink(gen())
                        tally.sinks += 1
                        tally.mismatches += total != sum(map(len, chunks))
                except vrpc.RpcError as exc:
                    tally.errors.append(f"{exc.status.name}: {exc.message}")


async def _phase(
    uri: str, attester: vrpc.InsecureTestAttester, clients: int, seconds: float, tally: Tally
) -> None:
    stop = time.monotonic() + seconds
    await asyncio.wait_for(
        asyncio.gather(*(_client_loop(uri, attester, i, stop, tally) for i in range(clients))),
        seconds + 60,
    )


async def soak(seconds: float, clients: int) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    attester = vrpc.InsecureTestAttester(seed=b"soak")
    with tempfile.TemporaryDirectory(prefix="vrpc-soak-") as tmp:
        uri = f"unix://{tmp}/soak.sock"
        server = vrpc.Server([EchoImpl()], attester=attester)
        await server.start(uri)
        warm = Tally()
        await _phase(uri, attester, clients, min(2.0, seconds / 5), warm)
        await asyncio.sleep(0.2)
        gc.collect()
        tasks0, fds0, rss0 = len(asyncio.all_tasks()), fd_count(), rss_bytes()

        tally = Tally()
        started = time.monotonic()
        await _phase(uri, attester, clients, seconds, tally)
        elapsed = time.monotonic() - started
        for _ in range(100):  # connections wind down asynchronously
            if server.connection_count == 0 and fd_count() <= fds0:
                break
            await asyncio.sleep(0.05)
        gc.collect()
        tasks1, fds1, rss1 = len(asyncio.all_tasks()), fd_count(), rss_bytes()
        await server.close(grace=1.0)

    calls = tally.unary + tally.streams + tally.sinks
    growth = rss1 - rss0
    problems = []
    if tally.mismatches:
        problems.append(f"{tally.mismatches} results did not match what was sent")
    if tally.errors or warm.errors:
        problems.append(f"{len(tally.errors) + len(warm.errors)} calls failed: {tally.errors[:3]}")
    if tasks1 > tasks0:
        problems.append(f"tasks leaked: {tasks0} -> {tasks1}")
    if fds1 > fds0:
        problems.append(f"file descriptors leaked: {fds0} -> {fds1}")
    if growth > RSS_BOUND:
        problems.append(f"RSS grew by {growth / 2**20:.1f} MiB (bound {RSS_BOUND / 2**20:.0f})")
    if calls == 0:
        problems.append("no calls were made")
    cells = [
        "soak",
        f"{elapsed:.0f} s",
        f"{clients} clients",
        f"{calls} calls ({tally.unary} unary, {tally.streams} streams / "
        f"{tally.stream_items} items, {tally.sinks} client streams)",
        f"{calls / elapsed:,.0f} calls/s",
        f"{tally.connections} connections",
        f"{tally.mismatches} mismatches",
        f"{len(tally.errors)} errors",
        f"tasks {tasks0}->{tasks1}",
        f"fds {fds0}->{fds1}",
        f"RSS {rss0 / 2**20:.1f}->{rss1 / 2**20:.1f} MiB",
    ]
    print("| " + " | ".join(cells) + " |")
    for problem in problems:
        print(f"soak FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


# ---------------------------------------------------------------------------- load scenarios


class Work(vrpc.Service, name="soakload.v1"):
    @vrpc.rpc
    async def work(self, i: int, seconds: float) -> int: ...

    @vrpc.rpc(idempotent=True)
    async def lookup(self, i: int, seconds: float) -> int: ...


class WorkImpl(Work):
    """Records when each call started (same process, same clock), which ones finished, and
    the most calls it ran at once."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.finished: set[int] = set()
        self.in_flight = 0
        self.max_in_flight = 0

    async def work(self, i: int, seconds: float) -> int:
        self.started[i] = time.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.in_flight -= 1
        self.finished.add(i)
        return i * 2

    async def lookup(self, i: int, seconds: float) -> int:
        return await self.work(i, seconds)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


async def load_fan_out(tmp: str, attester: vrpc.InsecureTestAttester, calls: int) -> list[str]:
    """One client, ``calls`` concurrent calls, a per-connection limit of a tenth of that."""
    limit = max(1, calls // 10)
    uri = f"unix://{tmp}/fanout.sock"
    impl = WorkImpl()
    problems = []
    gc.collect()
    rss0 = rss_bytes()
    server = vrpc.Server([impl], attester=attester, max_calls_per_connection=limit)
    await server.start(uri)
    try:
        async with vrpc.connect(uri, policy=attester.policy(), root=attester.trust_root()) as c:
            stub = c.stub(Work)
            issued: dict[int, float] = {}

            async def one(i: int) -> int:
                issued[i] = time.monotonic()
                return await stub.work(i, 0.05)

            started = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(calls)), return_exceptions=True), 300
            )
            elapsed = time.monotonic() - started
            rss_peak = rss_bytes()
    finally:
        await server.close(grace=1.0)
    gc.collect()
    rss1 = rss_bytes()
    errors = [r for r in results if isinstance(r, BaseException)]
    wrong = sum(1 for i, r in enumerate(results) if r != i * 2 and not isinstance(r, BaseException))
    waited = [impl.started[i] - issued[i] for i in impl.started]
    if errors:
        problems.append(f"fan-out: {len(errors)} of {calls} calls failed: {errors[:3]}")
    if wrong:
        problems.append(f"fan-out: {wrong} results did not match")
    if len(impl.started) != calls:
        problems.append(f"fan-out: the server ran {len(impl.started)} of {calls} calls")
    if impl.max_in_flight > limit:
        problems.append(f"fan-out: {impl.max_in_flight} calls ran at once, limit {limit}")
    if rss1 - rss0 > LOAD_RSS_BOUND:
        problems.append(f"fan-out: RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB")
    row(
        [
            "load: one client",
            f"{calls} concurrent calls, limit {limit}/connection",
            f"{len(errors)} errors, {wrong} mismatches",
            f"{impl.max_in_flight} in flight sustained",
            f"{calls / elapsed:,.0f} calls/s",
            f"queued p50 {pct(waited, 0.5) * 1000:.0f} ms p99 {pct(waited, 0.99) * 1000:.0f} ms",
            f"RSS {rss0 / 2**20:.1f}->{rss_peak / 2**20:.1f} (peak)->{rss1 / 2**20:.1f} MiB",
        ]
    )
    return problems


async def load_connection_limit(
    tmp: str, attester: vrpc.InsecureTestAttester, max_connections: int
) -> list[str]:
    """Twice ``max_connections`` clients connect at once: the excess is refused at once."""
    uri = f"unix://{tmp}/limit.sock"
    impl = WorkImpl()
    problems = []
    server = vrpc.Server([impl], attester=attester, max_connections=max_connections)
    await server.start(uri)
    clients = [
        vrpc.connect(uri, policy=attester.policy(), root=attester.trust_root(), connect_timeout=30)
        for _ in range(2 * max_connections)
    ]

    async def connect(c: vrpc.Client) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            await c.connect()
        except (vrpc.RpcError, vrpc.HandshakeError) as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    try:
        # All at once: the excess is refused while the others handshake.
        outcomes = await asyncio.wait_for(asyncio.gather(*(connect(c) for c in clients)), 120)
        refused = [(t, e) for t, e in outcomes if e is not None]
        admitted = [c for c, (_, e) in zip(clients, outcomes, strict=True) if e is None]
        # Then at the limit with no handshake under way: how long one refusal takes.
        late = clients[len(clients) // 2 :]
        late = [c for c in late if c not in admitted][:20]
        late_outcomes = [await connect(c) for c in late]
        answers = await asyncio.gather(
            *(c.stub(Work).work(i, 0) for i, c in enumerate(admitted)), return_exceptions=True
        )
        open_connections = server.connection_count
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await server.close(grace=1.0)
    unclear = [
        e
        for _, e in refused + late_outcomes
        if not (
            isinstance(e, vrpc.RpcError)
            and e.status is vrpc.Status.UNAVAILABLE
            and e.message == "server at connection limit"
        )
    ]
    if len(refused) != max_connections or len(admitted) != max_connections:
        problems.append(f"connection limit: {len(admitted)} admitted, {len(refused)} refused")
    if unclear:
        problems.append(f"connection limit: unclear refusals {unclear[:3]}")
    if answers != [i * 2 for i in range(len(admitted))]:
        problems.append("connection limit: an admitted client was not served")
    if open_connections != len(admitted):
        problems.append(f"connection limit: {open_connections} connections open")
    storm = [t * 1000 for t, _ in refused]
    alone = [t * 1000 for t, _ in late_outcomes]
    row(
        [
            "load: connection limit",
            f"{2 * max_connections} clients at once, max_connections {max_connections}",
            f"{len(admitted)} served, {len(refused)} refused UNAVAILABLE",
            f"refused in p50 {pct(storm, 0.5):.0f} ms max {max(storm, default=0):.0f} ms "
            f"(during {max_connections} handshakes)",
            f"at the limit: refused in p50 {pct(alone, 0.5):.1f} ms "
            f"max {max(alone, default=0):.1f} ms",
        ]
    )
    return problems


async def load_failover(tmp: str, attester: vrpc.InsecureTestAttester, calls: int) -> list[str]:
    """A pool over three servers; the second is stopped with calls in flight and restarted."""
    uris = [f"unix://{tmp}/pool{i}.sock" for i in range(3)]
    impls = [WorkImpl() for _ in range(3)]
    restarted = WorkImpl()
    problems = []
    servers = []
    for uri, impl in zip(uris, impls, strict=True):
        server = vrpc.Server([impl], attester=attester, max_calls_per_connection=64)
        await server.start(uri)
        servers.append(server)
    spread = 3.0  # seconds over which the calls are issued
    try:
        async with vrpc.Pool(
            uris,
            policy=attester.policy(),
            root=attester.trust_root(),
            health_interval=0.05,
            connections_per_endpoint=2,
        ) as pool:
            stub = pool.stub(Work)
            answered_at: dict[int, float] = {}

            async def one(i: int) -> int:
                await asyncio.sleep(spread * i / calls)
                result = await (stub.lookup(i, 0.05) if i % 2 else stub.work(i, 0.05))
                answered_at[i] = time.monotonic()
                return result

            load = asyncio.ensure_future(
                asyncio.gather(*(one(i) for i in range(calls)), return_exceptions=True)
            )
            await asyncio.sleep(spread / 3)
            stopped_at = time.monotonic()
            await servers[1].close(grace=0)
            await asyncio.sleep(spread / 6)
            servers[1] = vrpc.Server([restarted], attester=attester, max_calls_per_connection=64)
            await servers[1].start(uris[1])
            restarted_at = time.monotonic()
            results = await asyncio.wait_for(load, 300)
    finally:
        for server in servers:
            await server.close(grace=1.0)
    cut_off = set(impls[1].started) - impls[1].finished
    failures = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    successes = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    if len(successes) + len(failures) != calls:
        problems.append("failover: calls unaccounted for")
    if any(results[i] != i * 2 for i in successes):
        problems.append("failover: a result did not match")
    for i, exc in failures.items():
        if i % 2 or i not in cut_off:
            problems.append(f"failover: call {i} lost: {exc!r}")
        elif not (isinstance(exc, vrpc.RpcError) and exc.status is vrpc.Status.UNAVAILABLE):
            problems.append(f"failover: call {i} failed with {exc!r}")
    if not restarted.started:
        problems.append("failover: the restarted server got no calls")
    moved = [answered_at[i] - stopped_at for i in cut_off if i % 2 and i in answered_at]
    rejoined = min(restarted.started.values(), default=float("nan")) - restarted_at
    row(
        [
            "load: pool failover",
            f"{calls} calls over 3 servers, one restarted",
            f"{len(successes)} succeeded, {len(failures)} failed (all non-idempotent, cut off)",
            f"{len(cut_off)} cut off in flight",
            f"failover {max(moved, default=0) * 1000:.0f} ms",
            f"restarted server serving after {rejoined * 1000:.0f} ms",
        ]
    )
    return problems


async def load(calls: int) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    attester = vrpc.InsecureTestAttester(seed=b"soak-load")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vrpc-load-") as tmp:
        await asyncio.sleep(0)
        tasks0 = len(asyncio.all_tasks())
        problems += await load_fan_out(tmp, attester, calls)
        problems += await load_connection_limit(tmp, attester, 100)
        problems += await load_failover(tmp, attester, max(300, calls // 5))
        await asyncio.sleep(0.2)
        tasks1 = len(asyncio.all_tasks())
    if tasks1 > tasks0:
        problems.append(f"load: tasks leaked: {tasks0} -> {tasks1}")
    for problem in problems:
        print(f"soak FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--load-calls", type=int, default=10_000)
    parser.add_argument(
        "--defaults",
        choices=["auto", "yes", "no"],
        default="auto",
        help="the scenario at default keepalive settings (tests/soak_defaults.py; ~2 min); "
        "auto: when --seconds is at least 100",
    )
    args = parser.parse_args(argv)
    code = asyncio.run(soak(args.seconds, args.clients))
    if args.load_calls > 0:
        code |= asyncio.run(load(args.load_calls))
    if args.defaults == "yes" or (args.defaults == "auto" and args.seconds >= 100):
        from tests.soak_defaults import run as run_defaults

        failures, summary = asyncio.run(run_defaults(args.seconds))
        print(summary, flush=True)
        for problem in failures:
            print(f"soak FAILED: {problem}", file=sys.stderr)
        code |= 1 if failures else 0
    return code


if __name__ == "__main__":
    sys.exit(main())
