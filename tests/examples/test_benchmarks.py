"""The benchmark scripts run end to end (smoke sizes) and print every ratio row; no timing is asserted."""

import math
import os
import subprocess
import sys

import pytest


BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def ratio_rows(output: str) -> dict[str, list[float]]:
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) >= 4 and " vs " in cells[0]:
            rows[cells[0]] = [float(cell) for cell in cells[1:4]]
    return rows


@pytest.mark.parametrize(
    "script, args, expected_rows",
    [
        (
            "bench_core.py",
            ["--quick"],
            [
                "sigmoid vs trl_sigmoid",
                "flex_dpo vs sigmoid",
                "alpha_dpo vs sigmoid",
                "beta_dpo vs sigmoid",
                "simpo vs sigmoid",
                "probability vs sigmoid",
                "sigmoid_pipeline vs sigmoid",
                "simpo vs sigmoid_pipeline",
                "probability vs sigmoid_pipeline",
            ],
        ),
        ("bench_epsilon_dpo.py", ["--quick"], ["epsilon_dpo vs sigmoid", "epsilon_dpo vs naive"]),
    ],
)
def test_benchmark_prints_its_ratios(script, args, expected_rows):
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ratio_rows(result.stdout)
    assert sorted(rows) == sorted(expected_rows), result.stdout
    for name, ratios in rows.items():
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in ratios), (name, ratios)
