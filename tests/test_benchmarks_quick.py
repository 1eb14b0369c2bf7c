"""The benchmark harness end to end in its --quick form (no timing is asserted), and its report."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc", reason="the bench extra (grpcio) is not installed")
pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")

# The benchmarks package lives at the repository root and is not installed with vrpc.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.worker import SYSTEMS, process_cpu_seconds  # noqa: E402

ROW_FIELDS = {
    "system": str,
    "loop": str,
    "case": str,
    "payload_bytes": int,
    "concurrency": int,
    "calls_per_s": float,
    "runs": list,
    "spread": float,
}
NULLABLE = (
    "mb_per_s",
    "p50_us",
    "p99_us",
    "server_cpu_us_per_call",
    "client_cpu_us_per_call",
    "ratio_raw_echo",
    "ratio_grpc",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_json_with_the_schema(quick_run: Path) -> None:
    result = json.loads((quick_run / "latest.json").read_text())
    assert result["schema_version"] == report.SCHEMA_VERSION
    assert result["git_revision"]
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
        assert row["calls_per_s"] > 0
        assert row["runs"] and all(r > 0 for r in row["runs"])
    assert {t["name"] for t in result["targets"]}


def test_quick_run_has_rows_for_every_system(quick_run: Path) -> None:
    rows: list[dict[str, Any]] = json.loads((quick_run / "latest.json").read_text())["rows"]
    produced = {row["system"] for row in rows if row["case"] == "unary"}
    assert produced == set(SYSTEMS)
    cases = {(row["system"], row["case"]) for row in rows}
    for system in ("vrpc", "vrpc-plaintext", "raw-echo", "grpc-aio"):
        assert (system, "server-stream") in cases
        assert (system, "handshake") in cases
    vrpc_row = next(r for r in rows if r["system"] == "vrpc" and r["case"] == "unary")
    assert vrpc_row["ratio_raw_echo"] is not None
    assert vrpc_row["ratio_grpc"] is not None


def test_quick_run_measures_flow_control_within_its_bound(quick_run: Path) -> None:
    flow = json.loads((quick_run / "latest.json").read_text())["flow_control"]
    assert flow["received_bytes"] == flow["items"] * flow["item_bytes"]
    # Buffering, not timing: the receiver never holds more than the window plus one message.
    assert 0 < flow["max_buffered_bytes"] <= flow["window_bytes"] + flow["item_bytes"] + 64
    assert "### Flow control" in (quick_run / "performance.md").read_text()


def test_quick_run_writes_plot_and_markdown(quick_run: Path) -> None:
    assert (quick_run / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (quick_run / "performance.md").read_text()
    assert report.BEGIN in text and report.END in text
    assert "| system | loop | case |" in text
    assert "| vrpc | uvloop | unary |" in text


def test_verify_row_needs_the_vectors(quick_run: Path) -> None:
    vectors = REPO / ".." / "shared" / "vectors" / "attestation"
    rows = json.loads((quick_run / "latest.json").read_text())["rows"]
    verify = [r for r in rows if r["case"] == "verify"]
    if not vectors.exists():
        pytest.skip(f"attestation vectors not found: {vectors}")
    assert len(verify) == 1 and verify[0]["p50_us"] > 0


def test_markdown_replaces_only_the_marked_block(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Title\n\nbefore\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    result: dict[str, Any] = {
        "command": "python -m benchmarks",
        "created": "now",
        "git_revision": "abc",
        "machine": {"cpu": "x", "cores": 2, "kernel": "k", "python": "3.11", "packages": {}},
        "settings": {"runs": 3, "duration": 1.0},
        "notes": [],
        "targets": report.targets([]),
        "rows": [],
    }
    report.write_markdown(result, doc)
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n\n")
    assert text.endswith("\n\nafter\n")
    assert "old table" not in text
    assert text.count(report.BEGIN) == 1


def _row(system: str, loop: str, rate: float) -> dict[str, Any]:
    return {
        "system": system,
        "loop": loop,
        "case": "unary",
        "payload_bytes": 64,
        "concurrency": 1,
        "calls_per_s": rate,
    }


def test_ratios_compare_like_with_like() -> None:
    rows = [
        _row("vrpc", "uvloop", 100.0),
        _row("raw-echo", "uvloop", 400.0),
        _row("grpc-aio", "uvloop", 10.0),
        _row("vrpc", "asyncio", 50.0),
        _row("raw-echo", "asyncio", 100.0),
        _row("blocking-echo", "none", 800.0),
    ]
    report.add_ratios(rows)
    assert rows[0]["ratio_raw_echo"] == 0.25 and rows[0]["ratio_grpc"] == 10.0
    assert rows[3]["ratio_raw_echo"] == 0.5 and rows[3]["ratio_grpc"] is None
    assert rows[5]["ratio_raw_echo"] == 2.0  # the loop-less floor against the uvloop peer


def test_targets_report_met_and_missed() -> None:
    missed = report._target("t", 50.0, 100.0)
    assert missed["met"] is False and missed["shortfall_factor"] == 2.0
    met = report._target("t", 4.0, 5.0, higher=False, unit="ms")
    assert met["met"] is True and met["shortfall_factor"] is None
    assert report._target("t", None, 1.0)["met"] is None


def test_server_cpu_comes_from_proc() -> None:
    assert process_cpu_seconds(os.getpid()) > 0
