"""More than one process: ``trl-refpo dpo ... --num_processes N`` re-runs the command under ``accelerate launch``,
and each launched process checks that the trainer really sees the processes the launcher started."""

from __future__ import annotations

import os

import yaml

from .checks import require_deepspeed
from .errors import RecipeError
from .parsing import ParsedRecipe


CPU_DATA_PARALLEL = "examples/accelerate_configs/ddp.yaml with `use_cpu: true` in the recipe (data-parallel over gloo)"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _zero_without_cuda(processes: int | str) -> str:
    return (
        f"DeepSpeed ZeRO needs CUDA GPUs here: without CUDA accelerate starts {processes} processes but sets none of "
        f"them up for DeepSpeed, so each would train alone. On CPU launch with {CPU_DATA_PARALLEL} instead."
    )


def _no_gpu_hint() -> str:
    return "there is no GPU here: set `use_cpu: true` in the recipe (or --use_cpu) to train data-parallel on CPU"


def _zero_with_use_cpu() -> str:
    return (
        "`use_cpu: true` with a DeepSpeed (ZeRO) launch: accelerate would drop DeepSpeed and train plain "
        f"data-parallel. ZeRO runs on GPUs (remove use_cpu there); on CPU launch with {CPU_DATA_PARALLEL}."
    )


def check_launched_processes(training_args) -> None:
    """Stop when a launcher (``accelerate launch``, ``torchrun``) started processes the trainer does not see.

    Without this, ``WORLD_SIZE`` processes each train alone on the whole dataset into the same ``output_dir``.
    Reading ``training_args.world_size`` sets up accelerate's process group, as the trainer would.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        require_deepspeed("accelerate was launched with a DeepSpeed (ZeRO) config")
        if training_args.use_cpu:
            raise RecipeError(_zero_with_use_cpu())
        if not _cuda_available():  # decided before DeepSpeed's own setup (which compiles ops for minutes on CPU)
            raise RecipeError(_zero_without_cuda(launched))
    seen = training_args.world_size if launched > 1 else 1
    if seen != launched:
        hint = (
            _no_gpu_hint()
            if not _cuda_available() and not training_args.use_cpu
            else "check the launcher's num_processes and the accelerate config's distributed_type"
        )
        raise RecipeError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but the trainer sees {seen}: each "
            f"would train alone into the same output_dir; {hint}."
        )


def launch(parsed: ParsedRecipe) -> int:
    """Re-run this command under ``accelerate launch`` with the launch options from the command line."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    try:
        launch_args = resolve_accelerate_config_argument(parsed.launch_args)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    config_file = None
    for index, token in enumerate(launch_args):
        if token in ("--config_file", "--config-file") and index + 1 < len(launch_args):
            config_file = launch_args[index + 1]
    uses_deepspeed = "--use_deepspeed" in launch_args or "--use-deepspeed" in launch_args
    multi_gpu = "--multi_gpu" in launch_args or "--multi-gpu" in launch_args
    config = {}
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise RecipeError(f"accelerate config {config_file!r} does not exist.")
        with open(config_file) as f:
            config = yaml.safe_load(f) or {}
        distributed_type = str(config.get("distributed_type", "")).upper()
        uses_deepspeed |= distributed_type == "DEEPSPEED"
        multi_gpu |= distributed_type == "MULTI_GPU"
    processes = _option(launch_args, "--num_processes") or str(config.get("num_processes", 1))
    if uses_deepspeed:
        require_deepspeed(f"accelerate config {config_file or '--use_deepspeed'} uses DeepSpeed (ZeRO)")
        if parsed.training_args.use_cpu:
            raise RecipeError(_zero_with_use_cpu())
        if not _cuda_available():
            raise RecipeError(_zero_without_cuda(processes))
    elif multi_gpu and int(processes) > 1 and not parsed.training_args.use_cpu and not _cuda_available():
        launcher = config_file or "--multi_gpu"
        raise RecipeError(f"{processes} processes with a multi-GPU launch ({launcher}) but {_no_gpu_hint()}.")
    args = launch_command_parser().parse_args(launch_args + ["-m", "trl_refpo.cli", "dpo", *parsed.script_argv])
    try:
        launch_command(args)
    except Exception as error:  # noqa: BLE001 - the processes printed their own error; say which exit it was
        raise RecipeError(f"a launched process failed ({type(error).__name__}); see its error above.") from None
    return 0


def _option(tokens: list[str], name: str) -> str | None:
    for index, token in enumerate(tokens):
        if token == name and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None
