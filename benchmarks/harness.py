"""Run systems side by side: every server and client in its own process, all up at once, and
each case's repetitions interleaved across systems (A B C C B A A B C ...), so that a change in the
machine's load hits every system alike and the per-repetition ratios compare like with like.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0
# A generous bound on one command (a run is at most a few seconds): a worker that hangs fails the
# suite with its log instead of holding it forever.
COMMAND_TIMEOUT = 300.0


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The encrypted vrpc rows use the software test attester in both processes.
    env["VRPC_INSECURE_TEST_ATTESTATION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


class Worker:
    """A ``benchmarks.worker`` process and its line-JSON command channel."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self._log: BinaryIO = open(log, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=worker_env(),
            cwd=ROOT,
        )

    def _fail(self, why: str) -> RuntimeError:
        self._log.flush()
        tail = self.log_path.read_bytes()[-3000:].decode(errors="replace")
        return RuntimeError(f"{self.name}: {why}; its log ({self.log_path}) ends with:\n{tail}")

    def read(self, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        # Workers answer exactly one line per command, so nothing waits in the reader's buffer
        # between answers and select() on the pipe tells whether an answer has come.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise self._fail(f"no answer within {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise self._fail(f"exited ({self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise self._fail(answer["error"])
        return answer

    def ask(self, command: dict[str, Any], timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._fail(f"exited ({self.proc.wait()})") from None
        return self.read(timeout)

    def close(self) -> None:
        """End of input ends the worker; kill it if it does not go."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@dataclass
class Pair:
    """One system under one event loop: a server process and a client process."""

    system: str
    loop: str
    listen: str
    connect: str
    server: Worker | None = None
    client: Worker | None = None
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.system}-{self.loop}"


def label(case: dict[str, Any]) -> str:
    from benchmarks.report import _size

    if case["case"] in ("unary", "server-stream"):
        return f"{case['case']} {_size(case['payload_bytes'])} x{case['concurrency']}"
    return str(case["case"])


def case_key(case: dict[str, Any]) -> tuple[str, int, int]:
    return (case["case"], case["payload_bytes"], case["concurrency"])


def start_pairs(
    pairs: list[Pair],
    workdir: Path,
    *,
    server_options: Callable[[Pair], list[str]] = lambda _: [],
    client_options: Callable[[Pair], list[str]] = lambda _: [],
    timeout: float = START_TIMEOUT,
) -> None:
    """Start every server, then every client (each connects once and keeps its connection)."""
    for p in pairs:
        p.server = Worker(
            f"{p.tag} server",
            ["server", p.system, p.loop, p.listen, *server_options(p)],
            workdir / f"{p.tag}.server.log",
        )
    for p in pairs:
        assert p.server is not None
        p.server.read(timeout)
    for p in pairs:
        p.client = Worker(
            f"{p.tag} client",
            ["client", p.system, p.loop, p.connect, *client_options(p)],
            workdir / f"{p.tag}.client.log",
        )
    for p in pairs:
        assert p.client is not None
        p.client.read(timeout)


def stop_pairs(pairs: Iterable[Pair]) -> None:
    for p in pairs:
        for worker in (p.client, p.server):
            if worker is not None:
                worker.close()


def measure(pair: Pair, case: dict[str, Any], duration: float) -> dict[str, Any]:
    """One timed run on ``pair``: the client's figures plus the server's CPU per call."""
    assert pair.server is not None and pair.client is not None
    cpu0 = pair.server.ask({"op": "cpu"})["cpu_s"]
    run = pair.client.ask({"op": "run", "case": case, "duration": duration})
    cpu = pair.server.ask({"op": "cpu"})["cpu_s"] - cpu0
    run["server_cpu_us_per_call"] = cpu * 1e6 / run["calls"] if run["calls"] else None
    return run


def run_interleaved(
    pairs: list[Pair],
    cases: list[dict[str, Any]],
    applies: Callable[[Pair, dict[str, Any]], bool],
    *,
    reps: int,
    duration: float,
    warmup: float,
    say: Callable[[str], None] = lambda _: None,
) -> None:
    """For each case: one warm-up run per pair, then ``reps`` repetitions, each running every
    pair once in turn, in the opposite order every other repetition. Runs land in
    ``pair.runs[case_key(case)]`` in repetition order."""
    for case in cases:
        members = [p for p in pairs if applies(p, case)]
        if not members:
            continue
        started = time.monotonic()
        for p in members:
            measure(p, case, warmup)
        for rep in range(reps):
            # The order turns round every repetition: a system measured right after another
            # one's run (warm caches, a busy scheduler) is not always the same system.
            for p in members if rep % 2 == 0 else members[::-1]:
                p.runs.setdefault(case_key(case), []).append(measure(p, case, duration))
        say(
            f"   {label(case)}: "
            f"{len(members)} systems x {reps} repetitions in {time.monotonic() - started:.1f} s"
        )


def measure_memory(pair: Pair, *, connections: int, big: int) -> dict[str, Any]:
    """What connections hold in the server: ``connections`` more idle connections (each after
    one small call), then the peak while one ``big``-byte call is in flight. The server must run
    under ``--tracemalloc``."""
    assert pair.server is not None and pair.client is not None
    before = pair.server.ask({"op": "mem"})
    pair.client.ask({"op": "open", "count": connections})
    rest = pair.server.ask({"op": "mem"})
    reset = pair.server.ask({"op": "reset_peak"})
    if not pair.client.ask({"op": "echo", "size": big})["ok"]:
        raise RuntimeError(f"{pair.tag}: the {big}-byte echo came back different")
    peak = pair.server.ask({"op": "mem"})

    def per_connection(key: str) -> float | None:
        if before[key] is None or rest[key] is None:
            return None
        return float(rest[key] - before[key]) / connections

    return {
        "system": pair.system,
        "loop": pair.loop,
        "connections": connections,
        "call_bytes": big,
        "traced_per_connection_bytes": per_connection("traced"),
        "rss_per_connection_bytes": per_connection("rss"),
        # The peak over the big call, above the at-rest level just before it.
        "traced_call_peak_bytes": peak["traced_peak"] - rest["traced"],
        "rss_call_peak_bytes": (
            peak["hwm"] - rest["rss"]
            if reset["hwm_reset"] and peak["hwm"] is not None and rest["rss"] is not None
            else None
        ),
    }
