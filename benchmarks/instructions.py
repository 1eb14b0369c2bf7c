"""Instructions per call, counted by valgrind: a measure of vrpc's own work that does not move
with the machine's load, for comparing two revisions.

::

    python -m benchmarks.instructions                       # this checkout, 64 and 1 in flight
    python -m benchmarks.instructions --baseline /tmp/old   # and another revision beside it

One process runs a vrpc server and client (uvloop, Unix socket, encrypted session with the test
attester) and makes 64 B echo calls. It runs twice under ``valgrind --tool=callgrind`` with a
different number of calls, and the difference of the two instruction counts over the difference
of the calls is the instructions per call of both sides together: start-up, the handshake and
the exit cancel out. Time under valgrind is ~50x slower, so the counts are of the interpreter
and libraries, not of the kernel (system calls count only their user-space side) and not of
waiting. Needs valgrind (``apt-get install valgrind``); a run takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (calls in flight, rounds of the short run, rounds of the long run)
LOADS = {64: (20, 120), 1: (100, 600)}


def _one_run(source: str, concurrency: int, rounds: int) -> None:
    """The measured program: warm up, then ``rounds`` calls by each of ``concurrency`` callers.
    ``source`` goes first on the path before anything imports vrpc (as ``--baseline`` does in
    ``python -m benchmarks``): vrpc and services come from there, the harness from here."""
    sys.path.insert(0, source)
    os.environ["VRPC_INSECURE_TEST_ATTESTATION"] = "1"
    import uvloop

    import vrpc
    from benchmarks.vrpc_echo import quiet_logs
    from services.echo import Echo, EchoImpl

    quiet_logs()

    async def main() -> None:
        attester = vrpc.InsecureTestAttester(seed=b"instructions")
        with tempfile.TemporaryDirectory(prefix="vrpc-ir-") as tmp:
            uri = f"unix://{tmp}/s.sock"
            server = vrpc.Server([EchoImpl()], attester=attester)
            await server.start(uri)
            async with vrpc.connect(
                uri, policy=attester.policy(), root=attester.trust_root()
            ) as client:
                echo = client.stub(Echo)
                payload = b"x" * 64

                async def caller(n: int) -> None:
                    for _ in range(n):
                        await echo.echo(payload)

                await asyncio.gather(*(caller(5) for _ in range(concurrency)))
                await asyncio.gather(*(caller(rounds) for _ in range(concurrency)))
            await server.close(grace=0)

    uvloop.run(main())


def count(source: Path, concurrency: int, rounds: int) -> int:
    """Instructions of one run of the measured program with vrpc imported from ``source``."""
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--one-run",
            str(source),
            str(concurrency),
            str(rounds),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def per_call(source: Path, concurrency: int) -> float:
    short, long = LOADS[concurrency]
    low, high = count(source, concurrency, short), count(source, concurrency, long)
    return (high - low) / ((long - short) * concurrency)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--one-run"]:
        _one_run(argv[1], int(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("--baseline", metavar="DIR", help="also count another revision's vrpc")
    args = parser.parse_args(argv)
    sources = [("vrpc", ROOT)]
    if args.baseline:
        base = Path(args.baseline).resolve()
        if not (base / "vrpc" / "__init__.py").is_file():
            parser.error(f"--baseline {args.baseline}: no vrpc/__init__.py there")
        sources.append(("baseline", base))
    print("| revision | 64 B x64: instructions per call | 64 B x1: instructions per call |")
    print("|---|---|---|")
    for name, source in sources:
        many, one = per_call(source, 64), per_call(source, 1)
        print(f"| {name} ({source}) | {many:,.0f} | {one:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
