"""Test-harness helpers for DeepSpeed ZeRO on a CPU-only machine. Nothing here belongs in the library: users on
GPUs need none of it.

* :func:`patch_accelerate_for_cpu_deepspeed` — accelerate 1.15 finds no backend for a DeepSpeed launch without
  CUDA, reports one process, and a 2-rank trainer then fails in ``gather_for_metrics``. Call it in the worker,
  before anything creates accelerate's ``PartialState``.
* :func:`skip_shm_comm_build` — DeepSpeed would JIT-compile ``deepspeed_shm_comm`` (~2 min on 2 cores); plain gloo
  is enough for tests.
* :func:`launch_deepspeed` — runs a worker script under ``accelerate launch`` with ``examples/accelerate_configs``'
  ZeRO config and 2 processes, with a timeout and the workers' output tail in the failure message.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = ROOT / "examples" / "accelerate_configs"
DEEPSPEED_MISSING = 'needs DeepSpeed: pip install "trl-refpo[deepspeed]"'


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def patch_accelerate_for_cpu_deepspeed() -> None:
    """Make ``PartialState._prepare_backend`` pick gloo / MULTI_CPU for a CPU DeepSpeed launch.

    Applies only when there is no CUDA, ``LOCAL_RANK`` is set (a launcher started us) and
    ``ACCELERATE_USE_DEEPSPEED`` is true; every other case keeps accelerate's own answer.
    """
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_trl_refpo_cpu_deepspeed", False):
        return

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if (
            not torch.cuda.is_available()
            and int(os.environ.get("LOCAL_RANK", -1)) != -1
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        ):
            return "gloo", DistributedType.MULTI_CPU
        return original(self, cpu, sagemaker_dp, backend)

    _prepare_backend._trl_refpo_cpu_deepspeed = True
    PartialState._prepare_backend = _prepare_backend


def skip_shm_comm_build() -> None:
    """Tell DeepSpeed its shared-memory comm op is unavailable, so it uses gloo instead of compiling it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def end_worker() -> None:
    """Leave a worker process without the interpreter's C++ teardown: gloo's threads can race it under load
    ("terminate called without an active exception", SIGABRT after the results were written)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_deepspeed(
    script: Path | str,
    *script_args: str,
    zero_stage: int,
    num_processes: int = 2,
    launch_overrides: tuple[str, ...] = (),
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """Run ``script`` under ``accelerate launch --config_file examples/accelerate_configs/zero{stage}.yaml``.

    ``launch_overrides`` are extra ``accelerate launch`` flags (e.g. ``("--zero3_init_flag", "false")``); they
    win over the YAML. Raises ``AssertionError`` with the command and the tails of the workers' stdout and
    stderr when the launch fails or times out.
    """
    config = ACCELERATE_CONFIGS / f"zero{zero_stage}.yaml"
    if not config.exists():
        raise FileNotFoundError(f"no accelerate config for ZeRO-{zero_stage}: {config}")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
        *launch_overrides,
        str(script),
        *map(str, script_args),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(
            f"ZeRO-{zero_stage} launch timed out after {timeout:.0f}s: {' '.join(command)}\n"
            f"--- stdout tail ---\n{_tail(error.stdout)}\n--- stderr tail ---\n{_tail(error.stderr)}"
        ) from None
    if result.returncode != 0:
        raise AssertionError(
            f"ZeRO-{zero_stage} launch failed (exit {result.returncode}): {' '.join(command)}\n"
            f"--- stdout tail ---\n{_tail(result.stdout)}\n--- stderr tail ---\n{_tail(result.stderr, 8000)}"
        )
    return result


def _tail(text, size: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-size:]
