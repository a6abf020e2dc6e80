"""``trl-refpo dpo ... --num_processes N``: re-run the command under ``accelerate launch``."""

from __future__ import annotations

import os

import yaml

from .checks import require_deepspeed
from .errors import RecipeError
from .parsing import ParsedRecipe


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
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise RecipeError(f"accelerate config {config_file!r} does not exist.")
        with open(config_file) as f:
            uses_deepspeed |= str((yaml.safe_load(f) or {}).get("distributed_type", "")).upper() == "DEEPSPEED"
    if uses_deepspeed:
        require_deepspeed(f"accelerate config {config_file or '--use_deepspeed'} uses DeepSpeed (ZeRO)")
    args = launch_command_parser().parse_args(launch_args + ["-m", "trl_refpo.cli", "dpo", *parsed.script_argv])
    launch_command(args)
    return 0
