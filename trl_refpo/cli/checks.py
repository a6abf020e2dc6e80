"""Checks made before anything is loaded: models exist, optional packages are installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..offline_models import resolve_model_path
from .errors import RecipeError

DEEPSPEED_INSTALL = 'pip install "trl-refpo[deepspeed]"'


def require_deepspeed(why: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"{why}, but DeepSpeed is not installed. Install it with: {DEEPSPEED_INSTALL}")


def check_model_path(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Resolve ``offline:<name>`` and make sure the model exists before anything is loaded."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and not any(
        Path(path).glob("*.gguf")
    ):
        raise RecipeError(f"model_name_or_path {name_or_path!r} is a folder without config.json: not a model.")
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.dirname(path) or "\0")
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise RecipeError(f"model_name_or_path {name_or_path!r} does not exist (no such folder).")
    try:
        AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - whatever the cause, one line for the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(
            f"model_name_or_path {name_or_path!r} does not exist: no local folder with that path and no loadable "
            f"model of that name ({first_line})"
        ) from None
    return path
