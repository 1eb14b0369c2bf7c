"""The vsock lab benchmark's logic, run over Unix sockets (real vsock only runs in the lab VM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import vsock_lab  # noqa: E402


def test_outside_the_lab_it_refuses_vsock(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VRPC_VSOCK_LAB", raising=False)

    def no_workers(*_: Any, **__: Any) -> None:
        raise AssertionError("no server or client may start")

    monkeypatch.setattr(vsock_lab.harness, "start_pairs", no_workers)
    with pytest.raises(SystemExit) as info:
        vsock_lab.main([])
    assert info.value.code == 2
    assert "only inside the vsock lab VM" in capsys.readouterr().err


def test_in_the_lab_servers_listen_on_vsock_and_clients_dial_cid_1(tmp_path: Path) -> None:
    listen, connect = vsock_lab.addresses(False, tmp_path, 3, "vrpc-uvloop")
    port = vsock_lab.FIRST_PORT + 3
    assert port >= 50000
    assert (listen, connect) == (f"vsock://ANY:{port}", f"vsock://LOCAL:{port}")
    assert vsock_lab.addresses(True, tmp_path, 3, "x") == (f"unix://{tmp_path}/x.sock",) * 2


def test_unix_run_reports_ratios_for_both_loops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vsock.json"
    argv = ["--unix", "--reps", "2", "--duration", "0.02", "--warmup", "0", "--out", str(out)]
    assert vsock_lab.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["vsock"] is False and result["transport"] == "Unix sockets"
    assert {(r["system"], r["loop"]) for r in result["rows"]} == {
        (s, loop) for s in vsock_lab.SYSTEMS for loop in vsock_lab.LOOPS
    }
    assert len(result["rows"]) == len(vsock_lab.SYSTEMS) * len(vsock_lab.LOOPS) * 3
    assert {(e["loop"], e["payload_bytes"], e["concurrency"]) for e in result["ratios"]} == {
        (loop, c["payload_bytes"], c["concurrency"])
        for loop in vsock_lab.LOOPS
        for c in vsock_lab.CASES
    }
    for entry in result["ratios"]:
        assert entry["vrpc_over_raw_echo"]["n"] == 2
        assert entry["raw_echo_over_byte_echo"]["n"] == 2
    printed = capsys.readouterr().out
    assert "| loop | case | vrpc / raw-echo calls/s |" in printed
    line = next(x for x in printed.splitlines() if x.startswith("vsock-lab-json: "))
    assert json.loads(line.split(": ", 1)[1])["ratios"] == result["ratios"]
