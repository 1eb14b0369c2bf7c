"""The benchmark harness end to end in its --quick form (no timing is asserted), and its report."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc", reason="the bench extra (grpcio) is not installed")
pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")

# The benchmarks package lives at the repository root and is not installed with vrpc.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as suite  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.worker import BASELINE, SYSTEMS, server_command  # noqa: E402

REPS = suite.QUICK["reps"]
ROW_FIELDS = {
    "system": str,
    "loop": str,
    "case": str,
    "payload_bytes": int,
    "concurrency": int,
    "calls_per_s": float,
    "runs": list,
    "stats": dict,
    "spread": float,
}
NULLABLE = (
    "mb_per_s",
    "p50_us",
    "p99_us",
    "server_cpu_us_per_call",
    "client_cpu_us_per_call",
    "ratio_raw_echo",
    "ratio_byte_echo",
    "ratio_grpc",
)


def _git_status() -> str | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str | None]]:
    """`python -m benchmarks --quick` with $VRPC_BENCH_OUT naming its scratch directory;
    yields the directory and `git status` from before the run."""
    out = tmp_path_factory.mktemp("bench")
    before = _git_status()
    saved = os.environ.get("VRPC_BENCH_OUT")
    os.environ["VRPC_BENCH_OUT"] = str(out)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            assert suite.main(["--quick"]) == 0
    finally:
        if saved is None:
            del os.environ["VRPC_BENCH_OUT"]
        else:
            os.environ["VRPC_BENCH_OUT"] = saved
    (out / "said.txt").write_text(said.getvalue())
    yield out, before


@pytest.fixture(scope="module")
def result(quick_run: tuple[Path, str | None]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((quick_run[0] / "latest.json").read_text())
    return data


def test_quick_run_leaves_the_working_tree_unchanged(quick_run: tuple[Path, str | None]) -> None:
    out, before = quick_run
    if before is None:
        pytest.skip("not a git checkout")
    assert (out / "latest.json").exists() and (out / "performance.md").exists()
    assert _git_status() == before
    # The run says where it writes.
    assert f"-- writing to {out} and {out / 'performance.md'}" in (out / "said.txt").read_text()


def test_quick_run_writes_json_with_the_schema(result: dict[str, Any]) -> None:
    assert result["schema_version"] == report.SCHEMA_VERSION == 2
    assert result["git_revision"]
    assert result["settings"]["quick"] is True and result["settings"]["reps"] == REPS
    machine = result["machine"]
    assert {"cpu", "cores", "kernel", "python", "packages"} <= machine.keys()
    assert machine["packages"]["grpcio"]
    assert result["rows"]
    for row in result["rows"]:
        for name, kind in ROW_FIELDS.items():
            assert isinstance(row[name], kind), (name, row)
        for name in NULLABLE:
            assert name in row, (name, row)
        assert row["system"] in SYSTEMS
        assert row["loop"] in ("uvloop", "asyncio", "none")
        assert row["case"] in ("unary", "server-stream", "handshake", "verify")
        # One run per repetition, and the row's figure is their median.
        assert len(row["runs"]) == REPS
        rates = sorted(r["calls_per_s"] for r in row["runs"])
        assert all(r > 0 for r in rates)
        assert row["stats"]["calls_per_s"]["min"] == rates[0]
        assert row["stats"]["calls_per_s"]["max"] == rates[-1]
        assert row["calls_per_s"] == pytest.approx(sum(rates) / len(rates))


def test_quick_run_has_rows_for_every_system(result: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = result["rows"]
    produced = {row["system"] for row in rows if row["case"] == "unary"}
    assert produced == set(SYSTEMS)
    cases = {(row["system"], row["case"]) for row in rows}
    for system in ("vrpc", "vrpc-plaintext", "raw-echo", "grpc-aio"):
        assert (system, "server-stream") in cases
        assert (system, "handshake") in cases
    # The byte echo is a ceiling for unary calls only, and has no per-call latency.
    byte = [r for r in rows if r["system"] == "byte-echo"]
    assert {r["case"] for r in byte} == {"unary"} and {r["loop"] for r in byte} == {"uvloop"}
    assert {(r["payload_bytes"], r["concurrency"]) for r in byte} >= {(64, 64), (1 << 20, 4)}
    assert all(r["p50_us"] is None for r in byte)
    vrpc_row = report._find(rows, "vrpc", "unary", 64, 64)
    assert vrpc_row is not None
    for name, peer in report.PEERS:
        assert vrpc_row[name] is not None
        assert vrpc_row["ratio_stats"][peer]["n"] == REPS


def test_quick_run_reports_server_and_client_cpu(result: dict[str, Any]) -> None:
    for row in result["rows"]:
        if row["case"] == "verify":
            continue
        for r in row["runs"]:
            assert r["server_cpu_us_per_call"] is not None and r["server_cpu_us_per_call"] >= 0
            assert r["client_cpu_us_per_call"] is not None and r["client_cpu_us_per_call"] > 0


def test_quick_run_judges_every_target(result: dict[str, Any]) -> None:
    names = [t["name"] for t in result["targets"]]
    assert len(names) == 8
    for t in result["targets"]:
        assert t["verdict"] in (report.MET, report.MISSED, report.NOISY)
        assert len(t["values"]) == REPS
        assert t["verdict"] == report.verdict(t["stats"], t["target"], t["higher_is_better"])


def test_quick_run_measures_memory_per_connection(result: dict[str, Any]) -> None:
    memory = {m["system"]: m for m in result["memory"]}
    assert set(memory) == {"vrpc", "raw-echo"}
    for m in memory.values():
        assert m["connections"] == suite.QUICK["memory_connections"]
        assert m["traced_per_connection_bytes"] > 0
        # One 1 MiB call in flight holds at least the payload in the server's Python heap.
        assert m["traced_call_peak_bytes"] >= m["call_bytes"]


def test_quick_run_measures_flow_control_within_its_bound(
    result: dict[str, Any], quick_run: tuple[Path, str | None]
) -> None:
    flow = result["flow_control"]
    assert flow["received_bytes"] == flow["items"] * flow["item_bytes"]
    # Buffering, not timing: the receiver never holds more than the window plus one message.
    assert 0 < flow["max_buffered_bytes"] <= flow["window_bytes"] + flow["item_bytes"] + 64
    assert "### Flow control" in (quick_run[0] / "performance.md").read_text()


def test_quick_run_writes_plot_and_markdown(quick_run: tuple[Path, str | None]) -> None:
    out = quick_run[0]
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "performance.md").read_text()
    assert report.BEGIN in text and report.END in text
    assert "**Quick run: it checks the harness; its figures mean nothing.**" in text
    assert "| target | median | IQR | range | goal | verdict |" in text
    assert "| vrpc | uvloop | unary |" in text
    assert "| byte-echo | uvloop | unary |" in text
    assert "### Memory a connection holds (server process)" in text
    assert "### CPU per call (uvloop; µs, server / client" in text
    assert "| unary 64 B x64 | " in text


def test_verify_row_needs_the_vectors(result: dict[str, Any]) -> None:
    vectors = REPO / ".." / "shared" / "vectors" / "attestation"
    verify = [r for r in result["rows"] if r["case"] == "verify"]
    if not vectors.exists():
        pytest.skip(f"attestation vectors not found: {vectors}")
    assert len(verify) == 1 and verify[0]["p50_us"] > 0


# ------------------------------------------------------------------------ where runs write


def _args(*argv: str) -> argparse.Namespace:
    ns = argparse.Namespace(
        quick=False,
        out=None,
        docs=None,
        systems=None,
        loops=None,
        reps=None,
        baseline=None,
        argv=list(argv),
    )
    for flag in argv:
        if flag == "--quick":
            ns.quick = True
    return ns


def test_only_the_full_suite_writes_the_committed_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("VRPC_BENCH_OUT", raising=False)
    assert suite.destinations(_args()) == (suite.DEFAULT_OUT, suite.DEFAULT_DOCS)
    out, docs = suite.destinations(_args("--quick"))
    try:
        assert out.is_dir() and out.parent == Path(tempfile.gettempdir())
        assert docs == out / "performance.md"
    finally:
        out.rmdir()
    partial = _args()
    partial.systems = ["vrpc"]
    monkeypatch.setenv("VRPC_BENCH_OUT", str(tmp_path))
    assert suite.destinations(partial) == (tmp_path, tmp_path / "performance.md")
    assert suite.destinations(_args("--quick"))[0] == tmp_path
    # An A/B against another revision is a partial run too.
    against = _args()
    against.baseline = str(tmp_path)
    assert suite.destinations(against) == (tmp_path, tmp_path / "performance.md")


def test_a_quick_run_refuses_the_committed_paths(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--quick", "--out", str(suite.DEFAULT_OUT)],
        ["--quick", "--out", "/tmp/x", "--docs", str(suite.DEFAULT_DOCS)],
        ["--systems", "raw-echo", "--out", str(suite.DEFAULT_OUT)],
    ):
        with pytest.raises(SystemExit) as info:
            suite.main(argv)
        assert info.value.code == 2
        assert "only the full suite" in capsys.readouterr().err


# ------------------------------------------------------------------------ the report


def test_markdown_replaces_only_the_marked_block(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Title\n\nbefore\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    result: dict[str, Any] = {
        "command": "python -m benchmarks",
        "created": "now",
        "git_revision": "abc",
        "machine": {"cpu": "x", "cores": 2, "kernel": "k", "python": "3.11", "packages": {}},
        "settings": {"reps": 5, "duration": 1.0, "quick": False},
        "notes": [],
        "targets": report.targets([]),
        "rows": [],
    }
    report.write_markdown(result, doc)
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n\n")
    assert text.endswith("\n\nafter\n")
    assert "old table" not in text and "Quick run" not in text
    assert text.count(report.BEGIN) == 1
    assert all(t["verdict"] == report.NO_DATA for t in result["targets"])


def test_markdown_says_when_the_machine_was_too_noisy() -> None:
    result: dict[str, Any] = {
        "command": "python -m benchmarks",
        "created": "now",
        "git_revision": "abc",
        "machine": {"cpu": "x", "cores": 2, "kernel": "k", "python": "3.11", "packages": {}},
        "settings": {"reps": 5, "duration": 1.0, "quick": False},
        "notes": [],
        "rows": [],
        "targets": [
            report.judge("a", [0.7, 0.75, 0.85, 0.9, 0.95], 0.8),
            report.judge("b", [0.9, 0.9, 0.9, 0.9, 0.9], 0.8),
        ],
    }
    text = report.markdown(result)
    assert "The machine was too noisy to judge 1 of 2 targets in this run." in text
    assert "| a | 0.85 x | 0.75-0.9 | 0.7-0.95 | >= 0.8 | *too noisy to judge* |" in text
    result["targets"] = result["targets"][1:]
    assert "The machine was too noisy" not in report.markdown(result)


def _row(system: str, loop: str, rates: list[float], p50: list[float] | None = None) -> Any:
    case = {"case": "unary", "payload_bytes": 64, "concurrency": 1}
    runs = [
        {"calls": 1, "calls_per_s": r, "p50_us": p, "server_cpu_us_per_call": 1.0}
        for r, p in zip(rates, p50 or [None] * len(rates), strict=True)
    ]
    return report.make_row(system, loop, case, runs)


def test_ratios_pair_repetitions_and_compare_like_with_like() -> None:
    rows = [
        _row("vrpc", "uvloop", [100.0, 300.0, 200.0]),
        _row("raw-echo", "uvloop", [400.0, 300.0, 200.0]),
        _row("grpc-aio", "uvloop", [10.0, 10.0, 10.0]),
        _row("vrpc", "asyncio", [50.0, 50.0, 50.0]),
        _row("raw-echo", "asyncio", [100.0, 100.0, 100.0]),
        _row("blocking-echo", "none", [800.0, 600.0, 400.0]),
    ]
    report.add_ratios(rows)
    # Repetition by repetition: 0.25, 1.0, 1.0 (not median/median = 200/300).
    assert rows[0]["ratio_raw_echo"] == 1.0
    assert rows[0]["ratio_stats"]["raw-echo"]["min"] == 0.25
    assert rows[0]["ratio_grpc"] == 20.0 and rows[0]["ratio_byte_echo"] is None
    assert rows[3]["ratio_raw_echo"] == 0.5 and rows[3]["ratio_grpc"] is None
    assert rows[5]["ratio_raw_echo"] == 2.0  # the loop-less floor against the uvloop peer


def test_stats_give_median_quartiles_and_range() -> None:
    s = report.stats([5.0, 1.0, 3.0, None, 2.0, 4.0])
    assert s == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert report.stats([None]) is None
    one = report.stats([7.0])
    assert one is not None and one["q1"] == one["q3"] == 7.0


def test_verdict_is_met_missed_or_too_noisy() -> None:
    # Five repetitions: met when four of them meet the goal (the IQR is above it).
    assert report.judge("t", [0.9, 0.85, 0.7, 0.95, 0.82], 0.8)["verdict"] == report.MET
    missed = report.judge("t", [0.4, 0.5, 0.45, 0.6, 0.85], 0.8)
    assert missed["verdict"] == report.MISSED
    assert missed["shortfall_factor"] == pytest.approx(0.8 / 0.5)
    noisy = report.judge("t", [0.7, 0.75, 0.85, 0.9, 0.95], 0.8)
    assert noisy["verdict"] == report.NOISY and noisy["shortfall_factor"] is None
    # Lower is better (latency, CPU).
    assert report.judge("t", [1.0, 1.1, 1.2], 1.3, higher=False)["verdict"] == report.MET
    assert report.judge("t", [1.4, 1.5, 1.6], 1.3, higher=False)["verdict"] == report.MISSED
    # One outlier among five does not flip the verdict; the goal itself counts as met.
    assert report.judge("t", [1.0, 1.1, 1.3, 1.25, 2.0], 1.3, higher=False)["verdict"] == report.MET
    assert report.judge("t", [1.0, 1.4, 1.6], 1.3, higher=False)["verdict"] == report.NOISY
    assert report.judge("t", [], 1.0)["verdict"] == report.NO_DATA


def test_targets_use_the_per_repetition_values() -> None:
    mib = 1 << 20
    case = {"case": "unary", "payload_bytes": mib, "concurrency": 4}
    vrpc = report.make_row("vrpc", "uvloop", case, [{"calls": 1, "calls_per_s": 90.0}] * 3)
    raw = report.make_row(
        "raw-echo", "uvloop", case, [{"calls": 1, "calls_per_s": v} for v in (100.0, 100, 200)]
    )
    target = report.targets([vrpc, raw])[0]
    assert target["name"].startswith("1 MiB x4: vrpc / raw-echo")
    assert target["values"] == [0.9, 0.9, 0.45] and target["verdict"] == report.NOISY


def test_server_cpu_is_the_server_process_own_clock() -> None:
    first = server_command({"op": "cpu"})["cpu_s"]
    deadline = time.process_time() + 0.02
    while time.process_time() < deadline:
        pass
    assert server_command({"op": "cpu"})["cpu_s"] >= first + 0.02
    assert "error" in server_command({"op": "nonsense"})


def test_plot_colours_systems_apart_and_labels_quick_runs() -> None:
    every = {*SYSTEMS, BASELINE}
    assert set(report.COLOURS) == every
    assert len(set(report.COLOURS.values())) == len(every)
    result: dict[str, Any] = {
        "git_revision": "abc",
        "machine": {"cpu": "x"},
        "settings": {"reps": 2, "quick": True},
    }
    assert report.plot_title(result).startswith("QUICK RUN")
    result["settings"]["quick"] = False
    assert "QUICK" not in report.plot_title(result)
    sizes = [64, 1024, 64 * 1024, 1 << 20]
    assert [report._size(n) for n in sizes] == ["64 B", "1 KiB", "64 KiB", "1 MiB"]


def test_baseline_table_compares_repetition_by_repetition() -> None:
    rows = [
        _row("vrpc", "uvloop", [100.0, 300.0, 200.0], [10.0, 30.0, 20.0]),
        _row("vrpc-baseline", "uvloop", [200.0, 300.0, 100.0], [20.0, 30.0, 10.0]),
        _row("raw-echo", "uvloop", [400.0, 400.0, 400.0]),
    ]
    table = report.baseline_table(rows)
    assert len(table) == 3  # header, rule, one row: vrpc against its baseline only
    # Per repetition: 0.5, 1.0, 2.0 -> median 1.0, range 0.5-2.0; p50 likewise.
    assert (
        table[2]
        == "| uvloop | unary 64 B x1 | 1.000 | 0.750-1.500 | 0.500-2.000 | 1.000 | 0.750-1.500 |"
    )
    assert report.baseline_table(rows[:1] + rows[2:]) == []
    result = {"rows": rows, "baseline": "/src/old"}
    assert "Against the baseline (/src/old)" in report.markdown_baseline(result)


def test_baseline_must_hold_a_vrpc_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        suite.main(["--baseline", str(tmp_path)])
    assert "no vrpc/__init__.py" in capsys.readouterr().err


def test_the_baseline_worker_imports_vrpc_from_the_other_tree(tmp_path: Path) -> None:
    """--vrpc-from puts the other revision first on the path before anything imports vrpc."""
    (tmp_path / "vrpc").mkdir()
    (tmp_path / "vrpc" / "__init__.py").write_text("raise SystemExit('vrpc from the baseline')\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.worker",
            "server",
            "vrpc-baseline",
            "asyncio",
            f"unix://{tmp_path}/s.sock",
            "--vrpc-from",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "vrpc from the baseline" in proc.stderr


def test_instruction_counts_difference_two_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import instructions

    # Start-up cancels out: a fixed cost plus 1,000 instructions per call.
    monkeypatch.setattr(
        instructions, "count", lambda source, conc, rounds: 5_000_000 + 1_000 * conc * rounds
    )
    assert instructions.per_call(REPO, 64) == 1_000
    assert instructions.per_call(REPO, 1) == 1_000


def test_the_instruction_count_program_runs_the_calls() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--one-run", str(REPO), "4", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_repetitions_alternate_their_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import harness

    order: list[str] = []

    def fake_measure(pair: Any, case: Any, duration: float) -> dict[str, Any]:
        order.append(pair.system)
        return {"calls": 1, "calls_per_s": 1.0}

    monkeypatch.setattr(harness, "measure", fake_measure)
    pairs = [harness.Pair(name, "uvloop", "a", "a") for name in ("A", "B", "C")]
    case = {"case": "unary", "payload_bytes": 64, "concurrency": 1}
    harness.run_interleaved(pairs, [case], lambda p, c: True, reps=3, duration=0, warmup=0)
    warmup, reps = order[:3], order[3:]
    assert warmup == ["A", "B", "C"]
    assert reps == ["A", "B", "C", "C", "B", "A", "A", "B", "C"]
    assert all(len(p.runs[harness.case_key(case)]) == 3 for p in pairs)


def test_the_handshake_latency_is_the_connect_not_the_close() -> None:
    # A stand-in system whose connect is instant and whose close takes 50 ms: the latency of the
    # handshake case must not include the close, while calls/s counts whole cycles.
    import asyncio
    import types

    from benchmarks.worker import AsyncClient

    class Fresh:
        async def close(self) -> None:
            await asyncio.sleep(0.05)

    async def open_client(address: str) -> Fresh:
        return Fresh()

    async def run() -> dict[str, Any]:
        client = AsyncClient("raw-echo", "unix:///nowhere")
        client.module = types.SimpleNamespace(open_client=open_client)
        case = {"case": "handshake", "payload_bytes": 0, "concurrency": 1}
        return await client.run(case, 0.3)

    row = asyncio.run(run())
    assert row["calls"] >= 2 and row["calls_per_s"] <= 1 / 0.05
    assert row["p50_us"] is not None and row["p50_us"] < 25_000


def test_the_handshake_timeline_lines_up_both_processes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.handshake_timeline", "--rounds", "30"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = [(line[:48].strip(), float(line[48:].split()[1])) for line in out.splitlines()[1:]]
    starts = dict(rows)
    ready = starts["client: connect() returned (session ready)"]
    closed = starts["client: close() returned"]
    assert 0 < ready < closed
    # The server's steps are on the same clock: it reads the ClientHello after the client
    # connected and before the session is ready.
    server_reads = [start for name, start in rows if name == "server data_received"]
    assert server_reads and 0 < min(server_reads) < ready
