"""The soak run (tests/soak.py) for 20 seconds, in its own process so its measurements of tasks,
file descriptors and RSS see only the soak."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_20_seconds() -> None:
    env = {**os.environ, "VRPC_INSECURE_TEST_ATTESTATION": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--seconds", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| 0 mismatches | 0 errors |" in proc.stdout
