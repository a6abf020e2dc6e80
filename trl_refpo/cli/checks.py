"""Checks made before anything is loaded: models exist, optional packages are installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..research.offline_models import resolve_model_path
from .errors import RecipeError


DEEPSPEED_INSTALL = 'pip install "trl-refpo[deepspeed]"'
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def require_deepspeed(why: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"{why}, but DeepSpeed is not installed. Install it with: {DEEPSPEED_INSTALL}")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_model_path(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, key: str = "model_name_or_path"
) -> str:
    """Resolve ``offline:<name>`` and make sure the model named by recipe key ``key`` exists before anything is
    loaded."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    if (
        os.path.isdir(path)
        and not os.path.isfile(os.path.join(path, "config.json"))
        and not any(Path(path).glob("*.gguf"))
    ):
        raise RecipeError(f"{key} {name_or_path!r} is a folder without config.json: not a model.")
    _check_local(path, name_or_path, key)
    try:
        AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - whatever the cause, one line for the user
        raise RecipeError(
            f"{key} {name_or_path!r} does not exist: no local folder with that path and no loadable "
            f"model of that name ({_first_line(error)})"
        ) from None
    return path


def check_tokenizer_path(name_or_path: str, trust_remote_code: bool = False, key: str = "tokenizer_name_or_path"):
    """Make sure the tokenizer named by recipe key ``key`` exists (a local folder with tokenizer files, or a
    loadable name) before anything is loaded."""
    path = resolve_model_path(name_or_path)
    _check_local(path, name_or_path, key)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES) and not any(
            Path(path).glob("*.gguf")
        ):
            files = ", ".join(TOKENIZER_FILES)
            raise RecipeError(f"{key} {name_or_path!r} is a folder without tokenizer files ({files}).")
        return path
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001
        raise RecipeError(
            f"{key} {name_or_path!r} does not exist: no local folder with that path and no loadable tokenizer of "
            f"that name ({_first_line(error)})"
        ) from None
    return path


def _check_local(path: str, name_or_path: str, key: str) -> None:
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.dirname(path) or "\0")
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise RecipeError(f"{key} {name_or_path!r} does not exist (no such folder).")


# ---------------------------------------------------------------------------------------------- optional packages
def _optimizer_package(optim: str) -> str | None:
    """The pip package transformers needs for optimizer ``optim`` (None: plain torch)."""
    if optim in ("adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit") or (
        optim.startswith(("paged_", "rmsprop_bnb"))
    ):
        return "bitsandbytes"
    prefixes = {"galore_": "galore-torch", "apollo_": "apollo-torch", "schedule_free_": "schedulefree"}
    for prefix, package in prefixes.items():
        if optim.startswith(prefix):
            return package
    return {
        "adamw_torch_4bit": "torchao",
        "adamw_torch_8bit": "torchao",
        "lomo": "lomo-optim",
        "adalomo": "lomo-optim",
        "grokadamw": "grokadamw",
        "adamw_anyprecision": "torchdistx",
    }.get(optim)


MODULE_OF_PACKAGE = {
    "bitsandbytes": "bitsandbytes",
    "flash-attn": "flash_attn",
    "liger-kernel": "liger_kernel",
    "kernels": "kernels",
    "galore-torch": "galore_torch",
    "apollo-torch": "apollo_torch",
    "schedulefree": "schedulefree",
    "torchao": "torchao",
    "lomo-optim": "lomo_optim",
    "grokadamw": "grokadamw",
    "torchdistx": "torchdistx",
}


def required_packages(training_args, model_args) -> dict[str, str]:
    """Recipe settings that need a package beyond trl-refpo's requirements: {``key: value``: pip package}."""
    needs = {}
    attn = model_args.attn_implementation
    if attn in ("flash_attention_2", "flash_attention_3"):
        needs[f"attn_implementation: {attn}"] = "flash-attn"
    elif attn and "/" in attn:  # a Hub kernel, e.g. kernels-community/flash-attn
        needs[f"attn_implementation: {attn}"] = "kernels"
    if getattr(training_args, "use_liger_kernel", False):
        needs["use_liger_kernel: true"] = "liger-kernel"
    for key in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, key, False):
            needs[f"{key}: true"] = "bitsandbytes"
    optim = getattr(training_args.optim, "value", training_args.optim)
    package = _optimizer_package(str(optim))
    if package is not None:
        needs[f"optim: {optim}"] = package
    return needs


def check_required_packages(training_args, model_args) -> None:
    """One line naming every setting whose package is missing, and the one ``pip install`` that fixes them all."""
    missing = {
        setting: package
        for setting, package in required_packages(training_args, model_args).items()
        if importlib.util.find_spec(MODULE_OF_PACKAGE[package]) is None
    }
    if missing:
        needs = "; ".join(f"`{setting}` needs the package {package!r}" for setting, package in missing.items())
        raise RecipeError(
            f"{needs}, not installed: pip install {' '.join(dict.fromkeys(missing.values()))} (or change "
            f"{'that setting' if len(missing) == 1 else 'those settings'})."
        )
