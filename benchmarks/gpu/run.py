"""The GPU check: one script, at most 8 minutes on one CUDA GPU, one markdown file of results.

    python benchmarks/gpu/run.py [--out benchmarks/results/gpu-check.md]
    python benchmarks/gpu/run.py --dry-run       # on CPU: every command resolved, nothing heavy run

Steps (each with its own time limit; their sum stays under 8 minutes):

1. the head and ε-DPO tests (``tests/heads/test_completion_head.py``, ``tests/objectives/test_epsilon_dpo.py``), and a bf16 CUDA training
   smoke per loss type (``benchmarks/gpu/cuda_smoke.py``: TRL's fused LM head and the pipeline's completion head);
2. ``bench_core`` and ``bench_epsilon_dpo`` with ``--cuda-bf16``: ratios against TRL (and our sigmoid) measured in
   the same run;
3. one ZeRO-3 launch on 1 process (``examples/accelerate_configs/zero3.yaml``) of the 2-process test's worker,
   cases ``epsilon_dpo`` and ``cross_tokenizer`` (a reference with its own tokenizer).

The markdown file holds, per step, the command, its exit status, its time and the tail of its output.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 480


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    needs_files: list[Path] = field(default_factory=list)
    needs_modules: list[str] = field(default_factory=list)
    flags_checked: bool = False  # dry run: the script must define every flag the command passes


def steps(work: Path) -> list[Step]:
    python = sys.executable
    ref = work / "cross_tokenizer_reference"
    zero3_out = work / "zero3"
    return [
        Step(
            "head and ε-DPO tests",
            [
                python,
                "-m",
                "pytest",
                "-q",
                "-x",
                "tests/heads/test_completion_head.py",
                "tests/objectives/test_epsilon_dpo.py",
            ],
            100,
            [ROOT / "tests/heads/test_completion_head.py", ROOT / "tests/objectives/test_epsilon_dpo.py"],
            ["pytest"],
        ),
        Step(
            "CUDA bf16 training smoke",
            [python, "benchmarks/gpu/cuda_smoke.py"],
            50,
            [ROOT / "benchmarks/gpu/cuda_smoke.py"],
        ),
        Step(
            "bench_core (bf16, vs TRL)",
            [python, "benchmarks/bench_core.py", "--cuda-bf16"],
            110,
            [ROOT / "benchmarks/bench_core.py"],
            flags_checked=True,
        ),
        Step(
            "bench_epsilon_dpo (bf16)",
            [python, "benchmarks/bench_epsilon_dpo.py", "--cuda-bf16"],
            110,
            [ROOT / "benchmarks/bench_epsilon_dpo.py"],
            flags_checked=True,
        ),
        Step(
            "save the cross-tokenizer reference",
            [
                python,
                "-c",
                "import sys; from trl_refpo.testing import save_tiny_llama, tiny_bpe_tokenizer; "
                "save_tiny_llama(sys.argv[1], tiny_bpe_tokenizer(), seed=1)",
                str(ref),
            ],
            20,
        ),
        Step(
            "ZeRO-3, 1 process: epsilon_dpo + cross_tokenizer",
            [
                python,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                "examples/accelerate_configs/zero3.yaml",
                "--num_processes",
                "1",
                "tests/deepspeed_worker.py",
                str(zero3_out),
                str(ref),
                "epsilon_dpo",
                "cross_tokenizer",
            ],
            90,
            [ROOT / "examples/accelerate_configs/zero3.yaml", ROOT / "tests/deepspeed_worker.py"],
            ["accelerate", "deepspeed"],
        ),
    ]


def resolve(step: Step) -> list[str]:
    """What keeps ``step`` from running here (a missing file, module or executable); empty when it resolves."""
    problems = [f"missing file {path.relative_to(ROOT)}" for path in step.needs_files if not path.exists()]
    problems += [f"missing module {name}" for name in step.needs_modules if importlib.util.find_spec(name) is None]
    if shutil.which(step.command[0]) is None and not Path(step.command[0]).exists():
        problems.append(f"no executable {step.command[0]}")
    if step.flags_checked and not problems:
        # Read, not run: the script and the shared helpers it takes its arguments from must define each flag.
        defined = (ROOT / step.command[1]).read_text() + (ROOT / "benchmarks/common.py").read_text()
        problems += [
            f"{flag} not accepted" for flag in step.command[2:] if flag.startswith("--") and f'"{flag}"' not in defined
        ]
    return problems


def _env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p),
        TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29517",
    )


def run(step: Step, deadline: float) -> tuple[int | str, float, str]:
    timeout = max(1, min(step.timeout_s, int(deadline - time.monotonic())))
    env = _env()
    start = time.monotonic()
    try:
        result = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        status = f"timeout after {timeout}s"
        output = (
            (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        )
    return status, time.monotonic() - start, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="resolve every command; run nothing heavy")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu-check.md"))
    cli = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    plan = steps(work)
    assert sum(step.timeout_s for step in plan) <= BUDGET_S, "the steps' limits exceed the 8-minute budget"

    lines = ["# GPU check", ""]
    if cli.dry_run:
        lines += ["Dry run: commands resolved, nothing run.", ""]
    else:
        import torch

        if not torch.cuda.is_available():
            print("No CUDA GPU is visible: run with --dry-run to check the commands.", file=sys.stderr)
            return 2
        lines += [f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", ""]
    lines += ["| step | command | status | seconds |", "|---|---|---|---|"]
    details, failed = [], False
    deadline = time.monotonic() + BUDGET_S
    for step in plan:
        shown = " ".join(Path(part).name if part == sys.executable else part for part in step.command)
        problems = resolve(step)
        if problems:
            failed = True
            lines.append(f"| {step.name} | `{shown}` | unresolved: {'; '.join(problems)} | |")
            continue
        if cli.dry_run:
            lines.append(f"| {step.name} | `{shown}` | resolved (limit {step.timeout_s}s) | |")
            continue
        status, seconds, output = run(step, deadline)
        failed |= status != 0
        lines.append(f"| {step.name} | `{shown}` | {status} | {seconds:.0f} |")
        details += [f"## {step.name}", "", "```", output[-4000:].rstrip(), "```", ""]
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.out).write_text("\n".join(lines + [""] + details) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {cli.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
