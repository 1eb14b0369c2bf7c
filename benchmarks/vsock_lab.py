"""vrpc against the raw and byte echoes over real AF_VSOCK, under both event loops.

::

    make bench-vsock                                   # scripts/vsock-lab runs this in its VM
    python -m benchmarks.vsock_lab --unix              # the same over Unix sockets, anywhere

Inside the vsock lab VM (``scripts/vsock-lab``; it sets ``VRPC_VSOCK_LAB=1``) every server listens
on ``vsock://ANY:PORT`` and its client connects to ``vsock://LOCAL:PORT`` (CID 1, the guest's vsock
loopback), so the bytes cross the kernel's vsock layer, and under uvloop the descriptor goes through
vrpc's AF_UNIX re-wrap (``vrpc.transport.vsock``). The VM's CPU is emulated: only the ratios mean
anything, not the absolute rates.

Outside the lab the script refuses to open a vsock socket (this machine's vsock belongs to its
hypervisor) unless ``--unix`` asks for Unix sockets instead, which checks the script anywhere.

The run is interleaved as ``python -m benchmarks`` is (``benchmarks.harness``). It prints a
Markdown table and one line ``vsock-lab-json: {...}`` with every row; ``--out FILE`` also writes
the JSON to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness, report
from benchmarks.harness import Pair

SYSTEMS = ("vrpc", "raw-echo", "byte-echo")
LOOPS = ("asyncio", "uvloop")
CASES: list[dict[str, Any]] = [
    {"case": "unary", "payload_bytes": 64, "concurrency": 1},
    {"case": "unary", "payload_bytes": 64, "concurrency": 64},
    {"case": "unary", "payload_bytes": 1024 * 1024, "concurrency": 4},
]
# Ports below 50000 are never used, as in tests/vsock.
FIRST_PORT = 50100
# Python starts slowly on the lab's emulated CPUs.
START_TIMEOUT = 300.0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def in_lab() -> bool:
    return os.environ.get("VRPC_VSOCK_LAB") == "1"


def addresses(unix: bool, workdir: Path, index: int, tag: str) -> tuple[str, str]:
    """(listen, connect) addresses of the ``index``-th pair."""
    if unix:
        address = f"unix://{workdir}/{tag}.sock"
        return address, address
    port = FIRST_PORT + index
    return f"vsock://ANY:{port}", f"vsock://LOCAL:{port}"


def ratio_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vrpc over raw-echo per loop and case: calls/s (MB/s alike) and, at 1 in flight, p50."""
    out = []
    for loop in LOOPS:
        for case in CASES:
            size, conc = case["payload_bytes"], case["concurrency"]
            v = report._find(rows, "vrpc", "unary", size, conc, loop)
            r = report._find(rows, "raw-echo", "unary", size, conc, loop)
            b = report._find(rows, "byte-echo", "unary", size, conc, loop)
            entry: dict[str, Any] = {
                "loop": loop,
                "payload_bytes": size,
                "concurrency": conc,
                "vrpc_over_raw_echo": report.stats(report.paired(v, r)),
                "raw_echo_over_byte_echo": report.stats(report.paired(r, b)),
            }
            if conc == 1:
                entry["vrpc_p50_over_raw_echo_p50"] = report.stats(report.paired(v, r, "p50_us"))
            out.append(entry)
    return out


def _r(s: dict[str, float] | None) -> str:
    return "-" if s is None else f"{s['median']:.3g} ({s['min']:.3g}-{s['max']:.3g})"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"vsock lab benchmark over {result['transport']}, {result['settings']['reps']} "
        f"interleaved repetitions of {result['settings']['duration']} s; median (min-max) of "
        "the per-repetition ratios.",
        "",
        "| loop | case | vrpc / raw-echo calls/s | vrpc / raw-echo p50 "
        "| raw-echo / byte-echo calls/s |",
        "|---|---|---|---|---|",
    ]
    for e in result["ratios"]:
        case = f"{report._size(e['payload_bytes'])} x{e['concurrency']}"
        lines.append(
            f"| {e['loop']} | {case} | {_r(e['vrpc_over_raw_echo'])} "
            f"| {_r(e.get('vrpc_p50_over_raw_echo_p50'))} "
            f"| {_r(e['raw_echo_over_byte_echo'])} |"
        )
    lines += [
        "",
        "| system | loop | case | calls/s | MB/s | p50 µs | server CPU µs/call |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        st = row["stats"]
        case = f"{report._size(row['payload_bytes'])} x{row['concurrency']}"
        lines.append(
            f"| {row['system']} | {row['loop']} | {case} | {report._ranged(st['calls_per_s'])} "
            f"| {report._num(row['mb_per_s'], 1)} | {report._num(row['p50_us'], 1)} "
            f"| {report._ranged(st['server_cpu_us_per_call'], 1)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vsock_lab", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--unix", action="store_true", help="Unix sockets instead of vsock (runs anywhere)"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per case (default 3)")
    parser.add_argument("--duration", type=float, default=0.5, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=0.2, help="seconds of warm-up per case")
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --duration positive")
    if not args.unix and not in_lab():
        # Fail closed: outside the lab VM this machine's vsock is not ours to use.
        parser.error(
            "real AF_VSOCK runs only inside the vsock lab VM (make bench-vsock); "
            "--unix runs the same benchmark over Unix sockets"
        )
    transport = "Unix sockets" if args.unix else "AF_VSOCK (CID 1 loopback in the lab VM)"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vrpc-vsock-bench-") as tmp:
        workdir = Path(tmp)
        pairs = []
        for system in SYSTEMS:
            for loop in args.loops:
                tag = f"{system}-{loop}"
                listen, connect = addresses(args.unix, workdir, len(pairs), tag)
                pairs.append(Pair(system, loop, listen, connect))
        _say(f"-- {len(pairs)} servers and clients over {transport}")
        try:
            harness.start_pairs(pairs, workdir, timeout=START_TIMEOUT)
            harness.run_interleaved(
                pairs,
                CASES,
                lambda _p, _c: True,
                reps=args.reps,
                duration=args.duration,
                warmup=args.warmup,
                say=_say,
            )
        finally:
            harness.stop_pairs(pairs)
    rows = [
        report.make_row(p.system, p.loop, case, p.runs[harness.case_key(case)])
        for case in CASES
        for p in pairs
        if harness.case_key(case) in p.runs
    ]
    report.add_ratios(rows)
    result = {
        "transport": transport,
        "vsock": not args.unix,
        "settings": {"reps": args.reps, "duration": args.duration, "warmup": args.warmup},
        "machine": report.machine(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows,
        "ratios": [e for e in ratio_summary(rows) if e["loop"] in args.loops],
    }
    print(markdown(result), flush=True)
    print("vsock-lab-json: " + json.dumps(result, separators=(",", ":")), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
