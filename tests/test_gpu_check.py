"""benchmarks/gpu/run.py --dry-run on CPU: every step's command resolves (files, modules, flags) within the
8-minute budget, and the markdown file lists them; nothing heavy runs."""

import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
STEPS = (
    "head and ε-DPO tests",
    "CUDA bf16 training smoke",
    "bench_core (bf16, vs TRL)",
    "bench_epsilon_dpo (bf16)",
    "save the cross-tokenizer reference",
    "ZeRO-3, 1 process: epsilon_dpo + cross_tokenizer",
)


def test_dry_run_resolves_every_command(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu/run.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("# GPU check\n\nDry run: commands resolved, nothing run.")
    rows = [line for line in report.splitlines() if line.startswith("| ") and "resolved (limit" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(STEPS)
    limits = [int(row.split("resolved (limit ")[1].split("s)")[0]) for row in rows]
    assert sum(limits) <= 480
    assert "unresolved" not in report
    assert "--cuda-bf16" in report and "--num_processes 1" in report


def test_a_missing_flag_is_reported(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks/gpu"))
    import run

    step = run.Step(
        "x",
        [sys.executable, "benchmarks/bench_core.py", "--no-such-flag"],
        1,
        [ROOT / "benchmarks/bench_core.py", ROOT / "no/such/file.py"],
        ["no_such_module"],
        True,
    )
    assert run.resolve(step) == ["missing file no/such/file.py", "missing module no_such_module"]
    step.needs_files, step.needs_modules = [], []
    assert run.resolve(step) == ["--no-such-flag not accepted"]
