"""``python -m benchmarks.pipeline``: vrpc's own round trips in one process."""

from __future__ import annotations

import math

from benchmarks.pipeline import measure


def test_pipeline_measures_cpu_and_page_faults_per_round_trip() -> None:
    for plaintext in (False, True):
        cpu, faults = measure(200_000, 3, plaintext=plaintext, reps=1)
        assert math.isfinite(cpu) and cpu > 0
        assert math.isfinite(faults) and faults >= 0
