"""``python -m benchmarks`` (``make bench``): run the suite; write JSON, a plot and a table.

::

    python -m benchmarks                  # the full suite, about 5 minutes on 2 cores
    python -m benchmarks --quick          # a tiny version in seconds (checks the harness only)
    python -m benchmarks --out DIR        # write latest.json, latest.png, performance.md to DIR
    python -m benchmarks profile          # pyinstrument profiles of the vrpc server process

Every (system, event loop) pair gets a fresh server process and a fresh client process that talk
over a Unix socket in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import flow, report
from benchmarks.worker import SYSTEMS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_DOCS = ROOT / "docs" / "performance.md"
LOOPS = ("uvloop", "asyncio")
SPREAD_WARNING = 1.25

FULL: dict[str, Any] = {
    "payloads": [64, 1024, 64 * 1024, 1024 * 1024],
    "concurrency": [1, 64],
    "extra": [(1024 * 1024, 4)],
    "stream_item": 64 * 1024,
    "stream_items": 256,
    "runs": 3,
    "duration": 0.8,
    "warmup": 0.2,
    "loops": LOOPS,
}
QUICK: dict[str, Any] = {
    "payloads": [64, 64 * 1024],
    "concurrency": [1, 8],
    "extra": [],
    "stream_item": 64 * 1024,
    "stream_items": 16,
    "runs": 2,
    "duration": 0.05,
    "warmup": 0.02,
    "loops": ("uvloop",),
}


def _cases(settings: dict[str, Any], system: str) -> list[dict[str, Any]]:
    pairs = [(p, c) for p in settings["payloads"] for c in settings["concurrency"]]
    pairs += list(settings["extra"])
    if system == "blocking-echo":
        # Blocking sockets have one call in flight by construction.
        return [
            {"case": "unary", "payload_bytes": p, "concurrency": 1} for p in settings["payloads"]
        ]
    cases: list[dict[str, Any]] = [
        {"case": "unary", "payload_bytes": p, "concurrency": c} for p, c in pairs
    ]
    cases.append(
        {
            "case": "server-stream",
            "payload_bytes": settings["stream_item"],
            "concurrency": 1,
            "items": settings["stream_items"],
        }
    )
    cases.append({"case": "handshake", "payload_bytes": 0, "concurrency": 1})
    return cases


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The encrypted vrpc rows use the software test attester in both processes.
    env["VRPC_INSECURE_TEST_ATTESTATION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def run_pair(
    system: str,
    loop: str,
    spec: dict[str, Any],
    workdir: Path,
    *,
    profile_out: Path | None = None,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Start the server, run the client against it, stop the server; return the client's rows."""
    tag = f"{system}-{loop}"
    sock = workdir / f"{tag}.sock"
    ready = workdir / f"{tag}.ready"
    spec_file = workdir / f"{tag}.spec.json"
    out_file = workdir / f"{tag}.out.json"
    spec_file.write_text(json.dumps(spec))
    env = _env()
    py = sys.executable
    server_cmd = [py, "-m", "benchmarks.worker", "server", system, loop, str(sock), str(ready)]
    if profile_out is not None:
        server_cmd.append(str(profile_out))
    with open(workdir / f"{tag}.server.log", "wb") as server_log:
        server = subprocess.Popen(
            server_cmd, env=env, stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{tag}: the server did not start (see its log)")
                time.sleep(0.02)
            client_cmd = [
                py,
                "-m",
                "benchmarks.worker",
                "client",
                system,
                loop,
                str(sock),
                str(server.pid),
                str(spec_file),
                str(out_file),
            ]
            client = subprocess.run(
                client_cmd, env=env, cwd=ROOT, timeout=timeout, capture_output=True, check=False
            )
            if client.returncode != 0:
                sys.stderr.write(client.stderr.decode(errors="replace")[-4000:])
                raise RuntimeError(f"{tag}: the client failed ({client.returncode})")
        finally:
            _stop(server)
    rows: list[dict[str, Any]] = json.loads(out_file.read_text())
    for row in rows:
        row["system"] = system
        row["loop"] = loop
    return rows


def run_verify(spec: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    spec_file = workdir / "verify.spec.json"
    out_file = workdir / "verify.out.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks.worker", "client", "verify", "none", "-", "0"]
    subprocess.run(
        [*cmd, str(spec_file), str(out_file)],
        env=_env(),
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    rows: list[dict[str, Any]] = json.loads(out_file.read_text())
    for row in rows:
        row["system"] = "vrpc"
        row["loop"] = "none"
    return rows


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_suite(args: argparse.Namespace) -> int:
    settings = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else DEFAULT_OUT
    docs = Path(args.docs) if args.docs else (out / "performance.md" if args.out else DEFAULT_DOCS)
    systems = args.systems or list(SYSTEMS)
    loops = args.loops or list(settings["loops"])
    base = {
        "runs": settings["runs"],
        "duration": settings["duration"],
        "warmup": settings["warmup"],
    }
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vrpc-bench-") as tmp:
        workdir = Path(tmp)
        for system in systems:
            for loop in ["none"] if system == "blocking-echo" else loops:
                _say(f"-- {system} / {loop}")
                spec = {**base, "cases": _cases(settings, system)}
                for row in run_pair(system, loop, spec, workdir):
                    rows.append(row)
                    _say(report.row_line(row))
        verify = run_verify(base, workdir)
        if verify:
            rows.extend(verify)
            _say(report.row_line(verify[0]))
        else:
            notes.append("verify: skipped, ../shared/vectors/attestation not found")
            _say("verify: skipped (../shared/vectors/attestation not found)")
    report.add_ratios(rows)
    for row in rows:
        if row["spread"] is not None and row["spread"] > SPREAD_WARNING:
            _say(
                f"warning: wide spread {row['spread']:.2f}x (max/min of runs) in "
                f"{report.row_label(row)}: compare with care"
            )
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    result = report.build(
        rows, settings={**base, "quick": args.quick}, command=command, notes=notes, root=ROOT
    )
    result["flow_control"] = flow.measure(args.quick)
    _say(report.flow_line(result["flow_control"]))
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
    report.plot(result, out / "latest.png")
    report.write_markdown(result, docs)
    for target in result["targets"]:
        _say(report.target_line(target))
    _say(f"wrote {out / 'latest.json'}, {out / 'latest.png'}, {docs} in {result['elapsed_s']} s")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    """Profile vrpc's server and client processes (uvloop, encrypted) under 64 B x 64,
    64 B x 1 and 1 MiB x 4 loads."""
    out = Path(args.out) if args.out else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    seconds = args.seconds
    loads = [("64Bx64", 64, 64), ("64Bx1", 64, 1), ("1MiBx4", 1024 * 1024, 4)]
    with tempfile.TemporaryDirectory(prefix="vrpc-profile-") as tmp:
        for name, size, conc in loads:
            target = out / f"profile-server-{name}.txt"
            spec = {
                "profile_out": str(out / f"profile-client-{name}.txt"),
                "runs": 1,
                "duration": seconds,
                "warmup": 0.2,
                "cases": [{"case": "unary", "payload_bytes": size, "concurrency": conc}],
            }
            rows = run_pair("vrpc", "uvloop", spec, Path(tmp), profile_out=target)
            _say(f"{name}: {report.row_line(rows[0])} (under the profiler)")
            _say(f"wrote {target}, {spec['profile_out']} (and .flat versions)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", nargs="?", default="run", choices=["run", "profile"])
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the harness")
    parser.add_argument("--out", help="directory for latest.json / latest.png (and performance.md)")
    parser.add_argument("--docs", help="the Markdown file whose bench markers get the table")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, help="only these systems")
    parser.add_argument("--loops", nargs="+", choices=LOOPS, help="only these event loops")
    parser.add_argument("--seconds", type=float, default=4.0, help="profile: seconds per load")
    args = parser.parse_args(argv)
    if args.command == "profile":
        return run_profile(args)
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
