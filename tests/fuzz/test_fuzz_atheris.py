"""A short, bounded atheris run of every fuzz target (skipped where atheris is not installed).

Longer runs: see tests/fuzz/README.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris not installed (pip install atheris)")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize("target", ["frames", "connection", "handshake", "records", "attestation"])
def test_fuzz_target_short_run(target: str, tmp_path: Path) -> None:
    env = {**os.environ, "VRPC_INSECURE_TEST_ATTESTATION": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(HERE / "fuzz_vrpc.py"), target, str(tmp_path / "corpus")]
    cmd += ["-runs=4000", "-max_len=70000", "-seed=1"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 4000 runs" in proc.stderr
