"""Soak: ``python -m tests.soak --seconds N`` (``make soak``).

Many concurrent clients against one server on a Unix socket, for N seconds: unary calls, server-
and client-streaming calls, each client reconnecting every few calls. Every acknowledged result is
checked against what was sent. After the run (and a warm-up that fills caches and pools), the
process must be back where it was: no leaked tasks, no leaked file descriptors, bounded RSS
growth. Prints one summary line; exits 1 if any check fails.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=48)
    args = parser.parse_args(argv)
    return asyncio.run(soak(args.seconds, args.clients))


if __name__ == "__main__":
    sys.exit(main())
