"""``python -m benchmarks`` (``make bench``): run the suite; write JSON, a plot and a table.

::

    python -m benchmarks                  # the full suite; updates the committed results
    python -m benchmarks --quick          # a tiny version in seconds (checks the harness only)
    python -m benchmarks --out DIR        # write latest.json, latest.png, performance.md to DIR
    python -m benchmarks profile          # pyinstrument profiles of the vrpc processes
    python -m benchmarks --systems vrpc raw-echo --baseline DIR   # A/B against another revision

``--baseline DIR`` adds the system ``vrpc-baseline``: the same harness with ``vrpc`` and
``services`` imported from DIR (a checkout of another revision, e.g. ``git worktree add DIR REV``),
so the two revisions' repetitions interleave in one run and the report has a table of
vrpc / baseline ratios taken repetition by repetition.

Every (system, event loop) pair gets its own server and client process, all started up front and
talking over Unix sockets in a temporary directory; each case's repetitions are interleaved
across the pairs (see ``benchmarks.harness``).

Only the full suite, run without ``--out``, writes the committed results
(``benchmarks/results/latest.{json,png}`` and ``docs/performance.md``). Every other run (``--quick``
or a subset of systems, loops or repetitions) writes to ``--out``, else ``$VRPC_BENCH_OUT``, else a
fresh temporary directory, and says where.
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

from benchmarks import flow, harness, report
from benchmarks.harness import Pair
from benchmarks.worker import BASELINE, SYSTEMS

ROOT = harness.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_DOCS = ROOT / "docs" / "performance.md"
LOOPS = ("uvloop", "asyncio")
SPREAD_WARNING = 1.25
MIB = 1024 * 1024

FULL: dict[str, Any] = {
    "payloads": [64, 1024, 64 * 1024, MIB],
    "concurrency": [1, 64],
    "extra": [(MIB, 4)],
    "stream_item": 64 * 1024,
    "stream_items": 256,
    "reps": 5,
    "duration": 0.6,
    "warmup": 0.2,
    "loops": LOOPS,
    "memory_connections": 32,
}
QUICK: dict[str, Any] = {
    "payloads": [64, 64 * 1024],
    "concurrency": [1, 64],
    "extra": [(MIB, 4)],
    "stream_item": 64 * 1024,
    "stream_items": 16,
    "reps": 2,
    "duration": 0.05,
    "warmup": 0.02,
    "loops": ("uvloop",),
    "memory_connections": 4,
}


def cases(settings: dict[str, Any]) -> list[dict[str, Any]]:
    pairs = [(p, c) for p in settings["payloads"] for c in settings["concurrency"]]
    pairs += [tuple(e) for e in settings["extra"]]
    out: list[dict[str, Any]] = [
        {"case": "unary", "payload_bytes": p, "concurrency": c} for p, c in pairs
    ]
    out.append(
        {
            "case": "server-stream",
            "payload_bytes": settings["stream_item"],
            "concurrency": 1,
            "items": settings["stream_items"],
        }
    )
    out.append({"case": "handshake", "payload_bytes": 0, "concurrency": 1})
    return out


def applies(pair: Pair, case: dict[str, Any]) -> bool:
    """blocking-echo has one call in flight by construction; byte-echo has neither streams nor
    handshakes."""
    if pair.system == "blocking-echo":
        return case["case"] == "unary" and case["concurrency"] == 1
    if pair.system == "byte-echo":
        return case["case"] == "unary"
    return True


def loops_for(system: str, loops: list[str]) -> list[str]:
    if system == "blocking-echo":
        return ["none"]
    if system == "byte-echo":
        # The ceiling is drawn for the fastest loop only.
        return ["uvloop"] if "uvloop" in loops else loops[:1]
    return loops


def run_verify(settings: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    import subprocess

    spec_file = workdir / "verify.spec.json"
    out_file = workdir / "verify.out.json"
    spec_file.write_text(json.dumps(settings))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", "verify", str(spec_file), str(out_file)],
        env=harness.worker_env(),
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    found = json.loads(out_file.read_text())
    rows = []
    for item in found:
        row = report.make_row("vrpc", "none", item["case"], item["runs"])
        row["note"] = item["note"]
        rows.append(row)
    return rows


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def is_full(args: argparse.Namespace) -> bool:
    return not (args.quick or args.systems or args.loops or args.reps or args.baseline)


def destinations(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where a run writes (results directory, Markdown file). Only a full run without --out
    writes the committed results; any other run goes to --out, $VRPC_BENCH_OUT or a new
    temporary directory, and may not name the committed files."""
    if args.out is None and is_full(args):
        return DEFAULT_OUT, Path(args.docs) if args.docs else DEFAULT_DOCS
    if args.out is not None:
        out = Path(args.out)
    elif os.environ.get("VRPC_BENCH_OUT"):
        out = Path(os.environ["VRPC_BENCH_OUT"])
    else:
        out = Path(tempfile.mkdtemp(prefix="vrpc-bench-"))
    docs = Path(args.docs) if args.docs else out / "performance.md"
    committed = out.resolve() == DEFAULT_OUT.resolve() or docs.resolve() == DEFAULT_DOCS.resolve()
    if committed and not is_full(args):
        raise ValueError(
            "only the full suite (`make bench`) writes the committed results; "
            "give a quick or partial run another --out/--docs"
        )
    return out, docs


def run_suite(args: argparse.Namespace) -> int:
    settings = dict(QUICK if args.quick else FULL)
    if args.reps:
        settings["reps"] = args.reps
    out, docs = destinations(args)
    systems = list(args.systems or SYSTEMS)
    if args.baseline:
        systems.append(BASELINE)
    loops = list(args.loops or settings["loops"])
    base = {k: settings[k] for k in ("reps", "duration", "warmup")}
    _say(f"-- writing to {out} and {docs}")
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    memory: list[dict[str, Any]] = []
    all_cases = cases(settings)
    with tempfile.TemporaryDirectory(prefix="vrpc-bench-") as tmp:
        workdir = Path(tmp)
        pairs = []
        for system in systems:
            for loop in loops_for(system, loops):
                address = f"unix://{workdir}/{system}-{loop}.sock"
                pairs.append(Pair(system, loop, address, address))
        _say(f"-- {len(pairs)} servers and clients: " + ", ".join(p.tag for p in pairs))
        try:
            harness.start_pairs(
                pairs,
                workdir,
                server_options=lambda p: baseline_options(p, args.baseline),
                client_options=lambda p: baseline_options(p, args.baseline),
            )
            harness.run_interleaved(pairs, all_cases, applies, **base, say=_say)
        finally:
            harness.stop_pairs(pairs)
        for p in pairs:
            for case in all_cases:
                runs = p.runs.get(harness.case_key(case))
                if runs:
                    rows.append(report.make_row(p.system, p.loop, case, runs))
        memory = measure_memory(systems, settings, workdir)
        verify = run_verify(base, workdir)
        if verify:
            rows.extend(verify)
        else:
            notes.append("verify: skipped, ../shared/vectors/attestation not found")
    report.add_ratios(rows)
    for row in rows:
        _say(report.row_line(row))
    for row in [] if args.quick else rows:
        if row["spread"] is not None and row["spread"] > SPREAD_WARNING:
            _say(
                f"warning: wide spread {row['spread']:.2f}x (max/min of repetitions) in "
                f"{report.row_label(row)}"
            )
    command = "python -m benchmarks" + (" " + " ".join(args.argv) if args.argv else "")
    result = report.build(
        rows, settings={**base, "quick": args.quick}, command=command, notes=notes, root=ROOT
    )
    result["memory"] = memory
    if args.baseline:
        result["baseline"] = str(Path(args.baseline).resolve())
    result["flow_control"] = flow.measure(args.quick)
    _say(report.flow_line(result["flow_control"]))
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
    report.plot(result, out / "latest.png")
    report.write_markdown(result, docs)
    for target in result["targets"]:
        _say(report.target_line(target))
    noisy = [t["name"] for t in result["targets"] if t["verdict"] == report.NOISY]
    if noisy:
        _say(f"the machine was too noisy to judge {len(noisy)} target(s): " + "; ".join(noisy))
    for mem in memory:
        _say(report.memory_line(mem))
    for line in report.baseline_table(rows):
        _say(line)
    _say(f"wrote {out / 'latest.json'}, {out / 'latest.png'}, {docs} in {result['elapsed_s']} s")
    return 0


MEMORY_SYSTEMS = ("vrpc", "raw-echo")


def baseline_options(pair: Pair, baseline: str | None) -> list[str]:
    if pair.system != BASELINE:
        return []
    assert baseline is not None
    return ["--vrpc-from", str(Path(baseline).resolve())]


def measure_memory(
    systems: list[str], settings: dict[str, Any], workdir: Path
) -> list[dict[str, Any]]:
    """Server-side memory per connection at rest and over one 1 MiB call (uvloop), in servers of
    their own run under tracemalloc (which slows them: they take no part in the timings)."""
    pairs = []
    for system in MEMORY_SYSTEMS:
        if system in systems:
            address = f"unix://{workdir}/{system}-mem.sock"
            pairs.append(Pair(system, "uvloop", address, address))
    if not pairs:
        return []
    try:
        harness.start_pairs(pairs, workdir, server_options=lambda _: ["--tracemalloc"])
        return [
            harness.measure_memory(p, connections=settings["memory_connections"], big=MIB)
            for p in pairs
        ]
    finally:
        harness.stop_pairs(pairs)


def run_profile(args: argparse.Namespace) -> int:
    """Profile vrpc's server and client processes (uvloop, encrypted) under 64 B x 64,
    64 B x 1 and 1 MiB x 4 loads."""
    out = Path(args.out) if args.out else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    loads = [("64Bx64", 64, 64), ("64Bx1", 64, 1), ("1MiBx4", MIB, 4)]
    with tempfile.TemporaryDirectory(prefix="vrpc-profile-") as tmp:
        workdir = Path(tmp)
        for name, size, conc in loads:
            server_out = out / f"profile-server-{name}.txt"
            client_out = out / f"profile-client-{name}.txt"
            address = f"unix://{workdir}/{name}.sock"
            pair = Pair("vrpc", "uvloop", address, address)
            case = {"case": "unary", "payload_bytes": size, "concurrency": conc}
            try:
                harness.start_pairs(
                    [pair],
                    workdir,
                    server_options=lambda _, o=server_out: ["--profile", str(o)],  # type: ignore[misc]
                    client_options=lambda _, o=client_out: ["--profile", str(o)],  # type: ignore[misc]
                )
                harness.measure(pair, case, 0.2)
                run = harness.measure(pair, case, args.seconds)
            finally:
                harness.stop_pairs([pair])
            row = report.make_row("vrpc", "uvloop", case, [run])
            _say(f"{name}: {report.row_line(row)} (under the profiler)")
            _say(f"wrote {server_out}, {client_out} (and .flat versions)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", nargs="?", default="run", choices=["run", "profile"])
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the harness")
    parser.add_argument("--out", help="directory for latest.json / latest.png (and performance.md)")
    parser.add_argument("--docs", help="the Markdown file whose bench markers get the table")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, help="only these systems")
    parser.add_argument("--loops", nargs="+", choices=LOOPS, help="only these event loops")
    parser.add_argument("--reps", type=int, help="repetitions per case (default: 5, quick: 2)")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run vrpc and services from DIR (another revision) as vrpc-baseline",
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="profile: seconds per load")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.baseline and not (Path(args.baseline) / "vrpc" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no vrpc/__init__.py there")
    if args.command == "profile":
        return run_profile(args)
    try:
        return run_suite(args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
