"""Parsing ``--config recipe.yaml`` plus command-line flags into TRL's dataclasses (``TrlParser``)."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..config import RefPOConfig
from .checks import require_deepspeed
from .errors import PROG, RecipeError
from .legacy import LEGACY_KEYS, translate_legacy


@dataclass
class RecipeArguments(ScriptArguments):
    """TRL's ``ScriptArguments`` plus the alignment-handbook's own recipe fields."""

    dataset_mixture: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "alignment-handbook dataset mixture: {datasets: [{id, config, split, columns, weight}], seed, "
            "test_split_size}. `weight` keeps that fraction of the dataset (after shuffling with `seed`)."
        },
    )
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template to set on the tokenizer."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use instead of the one stored with model_name_or_path."}
    )


DATACLASS_TYPES = (RecipeArguments, RefPOConfig, ModelConfig, DatasetMixtureConfig)


def build_parser() -> TrlParser:
    # allow_abbrev=False: `--learning_rat` is an unknown flag, as a misspelled recipe key is, not `--learning_rate`.
    parser = TrlParser(DATACLASS_TYPES, prog=PROG, allow_abbrev=False)
    parser.error = _raise_recipe_error  # argparse would print the whole usage (~180 lines) before the message
    return parser


def _raise_recipe_error(message: str):
    # "argument --beta: invalid float value: 'high'" → "beta: invalid float value: 'high'" (recipe key or flag)
    raise RecipeError(re.sub(r"^argument --([\w-]+)(/--[\w-]+)*:", r"\1:", message))


def _parser_dests(parser) -> set[str]:
    return {action.dest for action in parser._actions}


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ---------------------------------------------------------------------------------------------- parsing
@dataclass
class ParsedRecipe:
    script_args: RecipeArguments
    training_args: RefPOConfig
    model_args: ModelConfig
    dataset_args: DatasetMixtureConfig
    launch_args: list[str]  # options for `accelerate launch`; empty: run in this process
    script_argv: list[str]  # the command line without the launch options (what each launched process gets)
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    notes: list[str] = field(default_factory=list)


def _load_recipe(argv: list[str]) -> tuple[dict, str | None, list[str]]:
    argv = list(argv)
    path = None
    for index, token in enumerate(argv):
        if token == "--config":
            if index + 1 >= len(argv):
                raise RecipeError("--config needs a path to a YAML recipe.")
            path = argv[index + 1]
            del argv[index : index + 2]
            break
        if token.startswith("--config="):
            path = token.split("=", 1)[1]
            del argv[index]
            break
    if path is None:
        return {}, None, argv
    if not os.path.isfile(path):
        raise RecipeError(f"Recipe file {path!r} does not exist.")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise RecipeError(f"Recipe {path} is not valid YAML: {error}") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path} must be a YAML mapping of keys to values.")
    env = recipe.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"`env` in {path} must be a mapping of environment variables.")
    for key, value in env.items():
        os.environ[key] = str(value)
    return recipe, path, argv


def _split_flag(token: str) -> tuple[str, str | None]:
    name, _, value = token[2:].partition("=")
    return name, (value if "=" in token else None)


def _pop_cli_legacy(argv: list[str]) -> tuple[list[str], dict]:
    """Take legacy ``--key value`` / ``--key=value`` / bare ``--flag`` out of the command line."""
    kept, legacy = [], {}
    index = 0
    while index < len(argv):
        token = argv[index]
        name, inline = _split_flag(token) if token.startswith("--") else (None, None)
        if name in LEGACY_KEYS:
            if inline is not None:
                raw = inline
            elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                raw = argv[index + 1]
                index += 1
            else:
                raw = "true"
            legacy[name] = yaml.safe_load(raw)
        else:
            kept.append(token)
        index += 1
    return kept, legacy


def _cli_flag_names(argv: list[str], dests: set[str]) -> set[str]:
    names = set()
    for token in argv:
        if token.startswith("--"):
            name, _ = _split_flag(token)
            if name not in dests and name.startswith("no_") and name[3:] in dests:
                name = name[3:]
            names.add(name)
    return names


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {option for action in launch_command_parser()._actions for option in action.option_strings} | {
        "--accelerate_config"
    }


def _separate_launch_args(remaining: list[str], argv: list[str]) -> tuple[list[str], list[str]]:
    """Split the strings no dataclass consumed into `accelerate launch` options and unknown flags."""
    options = _launch_options()
    launch, unknown = [], []
    current = None
    for token in remaining:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            current = launch if name in options else unknown
        elif current is None:
            current = unknown
        current.append(token)
    return launch, unknown


def _parse_once(recipe: dict, argv: list[str]):
    parser = build_parser()
    parser.set_defaults_with_config(**recipe)
    try:
        *dataclasses_, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, TypeError) as error:
        raise RecipeError(str(error).strip().splitlines()[0] if str(error).strip() else repr(error)) from None
    return dataclasses_, remaining


def parse_recipe(argv: list[str]) -> ParsedRecipe:
    """Parse ``--config recipe.yaml`` and command-line flags; translate legacy keys; validate."""
    recipe, recipe_path, argv = _load_recipe(argv)
    full_argv = list(argv)
    source = f"recipe {recipe_path}" if recipe_path else "command line"
    legacy = {key: recipe.pop(key) for key in list(recipe) if key in LEGACY_KEYS}
    argv, cli_legacy = _pop_cli_legacy(argv)
    legacy.update(cli_legacy)

    dests = _parser_dests(build_parser())
    unknown = [key for key in recipe if key not in dests]
    if unknown:
        hints = "; ".join(f"{key}{_suggest(key, dests | set(LEGACY_KEYS))}" for key in unknown)
        raise RecipeError(f"Unknown key(s) in {source}: {hints}. Remove them or fix their names.")
    if "deepspeed" in recipe or any(t.split("=", 1)[0] == "--deepspeed" for t in argv):
        require_deepspeed("the recipe sets `deepspeed`")

    cli_flags = _cli_flag_names(argv, dests)
    explicit = set(recipe) | cli_flags
    notes = _choose_dataset_source(recipe, cli_flags)
    (script_args, training_args, model_args, dataset_args), remaining = _parse_once(recipe, argv)
    launch_args, unknown_flags = _separate_launch_args(remaining, argv)
    if unknown_flags:
        names = [t for t in unknown_flags if t.startswith("-")]
        hints = "; ".join(
            f"{name}{_suggest(name.lstrip('-').split('=')[0], dests | set(LEGACY_KEYS))}" for name in names
        )
        raise RecipeError(f"Unknown command-line argument(s): {hints or unknown_flags}.")

    overrides, legacy_notes, limits = translate_legacy(legacy, training_args, model_args, explicit)
    notes += legacy_notes
    if overrides:
        (script_args, training_args, model_args, dataset_args), _ = _parse_once(recipe, argv + _as_flags(overrides))
    script_argv = _subtract_subsequence(full_argv, launch_args)
    if recipe_path is not None:
        script_argv = ["--config", recipe_path, *script_argv]
    return ParsedRecipe(
        script_args,
        training_args,
        model_args,
        dataset_args,
        launch_args,
        script_argv,
        max_prompt_length=limits.get("max_prompt_length"),
        max_completion_length=limits.get("max_completion_length"),
        notes=notes,
    )


def _as_flags(overrides: dict) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flags.append(f"--{key}")
        flags.extend(str(v) for v in value) if isinstance(value, list) else flags.append(str(value))
    return flags


DATASET_SOURCES = ("dataset_mixture", "datasets", "dataset_name")


def _choose_dataset_source(recipe: dict, cli_flags: set[str]) -> list[str]:
    """One dataset source: a recipe may set only one; a command-line source replaces the recipe's."""
    in_recipe = [key for key in DATASET_SOURCES if key in recipe]
    on_cli = [key for key in DATASET_SOURCES if key in cli_flags]
    if len(in_recipe) > 1:
        raise RecipeError(f"The recipe sets {in_recipe}: they are alternative dataset sources; keep one.")
    if len(on_cli) > 1:
        raise RecipeError(f"The command line sets {on_cli}: they are alternative dataset sources; keep one.")
    if on_cli and in_recipe and in_recipe != on_cli:
        del recipe[in_recipe[0]]
        return [f"--{on_cli[0]} on the command line replaces the recipe's {in_recipe[0]}"]
    return []


def _subtract_subsequence(tokens: list[str], subsequence: list[str]) -> list[str]:
    remaining = iter(subsequence)
    current = next(remaining, None)
    kept = []
    for token in tokens:
        if current is not None and token == current:
            current = next(remaining, None)
        else:
            kept.append(token)
    return kept
