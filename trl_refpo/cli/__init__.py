"""``trl-refpo dpo``: the counterpart of ``trl dpo`` for trl-refpo's loss types and reference sources.

::

    trl-refpo dpo --config recipe.yaml [--key value ...]                      # one process
    trl-refpo dpo --config recipe.yaml --accelerate_config zero2 --num_processes 2
    accelerate launch --config_file zero3.yaml -m trl_refpo.cli dpo --config recipe.yaml

A recipe is an alignment-handbook DPO recipe as written — ``model_name_or_path``, ``torch_dtype``,
``dataset_mixture``, every ``DPOConfig`` / ``TrainingArguments`` field, the LoRA fields of TRL's
``ModelConfig`` — with ``loss_type`` and its hyperparameters (``RefPOConfig`` fields) added. Parsing
reuses TRL's ``TrlParser`` with ``ScriptArguments``, ``RefPOConfig``, ``ModelConfig`` and
``DatasetMixtureConfig``; command-line flags override the recipe.

Keys TRL 1.16 / transformers 5 no longer know but recipes still carry are never dropped silently
(:data:`LEGACY_KEYS`). Each is honoured with its old meaning, and the translation is printed:

====================================  =====================================================================
recipe key                            what trl-refpo does
====================================  =====================================================================
``torch_dtype``                       ``dtype`` (TRL's ``ModelConfig`` renamed it)
``max_prompt_length``                 prompts are cut to their LAST ``max_prompt_length`` tokens after
                                      tokenisation (TRL ≤ 0.19's ``tokenize_row``)
``max_completion_length``             chosen / rejected are cut to their FIRST ``max_completion_length``
                                      tokens; with both keys and no ``max_length``,
                                      ``max_length = max_prompt_length + max_completion_length``
``rpo_alpha`` / ``sft_weight``        ``loss_type += ["sft"]``, ``loss_weights += [value]`` (RPO / SimPO's
                                      SFT term: NLL of the chosen completion); null or 0: off
``reference_free: true``              ``sigmoid`` → ``probability`` (−log σ(β·[log π(y_w) − log π(y_l)]),
                                      the same formula); any other reference-based type is an error that
                                      lists the reference-free types. ``false``: no change
``warmup_ratio``                      ``warmup_steps`` (transformers 5 takes a ratio in [0, 1) there)
``evaluation_strategy``               ``eval_strategy``
``hub_model_revision``                ``hub_revision``
``preprocessing_num_workers``         ``dataset_num_proc``
``use_flash_attention_2: true``       ``attn_implementation: flash_attention_2``
``truncation_side``                   ``left`` → ``truncation_mode: keep_end``, ``right`` → ``keep_start``
``overwrite_output_dir``              accepted: trl-refpo never resumes implicitly (``resume_from_checkpoint``)
``dataset_mixer`` / ``dataset_splits`` rejected, with the equivalent ``dataset_mixture`` block in the message
====================================  =====================================================================

Any other unknown key is an error naming it (with the closest valid names). A translated key that
contradicts a key also present (e.g. ``torch_dtype`` and ``dtype``) is an error.

``max_prompt_length`` / ``max_completion_length`` also hold for a reference that re-scores the text (its own
tokenizer, or ``ref_prompt: none``): it keeps the same prompt and completion TEXT the policy keeps.

Every mistake in the setup — the recipe, a model / tokenizer / dataset that does not exist or lacks ``chosen`` /
``rejected``, a setting needing a package that is not installed, a launch whose processes the trainer would not
see — prints one line (``trl-refpo dpo: error: ...``) and exits with status 2, before training; ``--debug`` (or
``TRL_REFPO_DEBUG=1``) shows the traceback instead. After training the output folder holds what the
alignment-handbook's ``scripts/dpo.py`` leaves: the model, its card (tagged ``trl-refpo`` and the loss types),
``train_results.json``, ``trainer_state.json`` and, with an eval split (final ``evaluate()``),
``eval_results.json``; ``all_results.json`` holds both. trl-refpo's own log lines follow the recipe's
``log_level``.
"""

from __future__ import annotations

import os
import sys

from .checks import check_model_path
from .datasets import load_handbook_mixture, load_recipe_dataset
from .errors import PROG, RecipeError
from .launch import launch
from .legacy import LEGACY_KEYS, translate_legacy
from .parsing import ParsedRecipe, RecipeArguments, build_parser, parse_recipe
from .quiet import silence_project_triggered_warnings
from .run import build_trainer, run_dpo, train_and_save


DEBUG_ENV = "TRL_REFPO_DEBUG"
# Setup errors: our own checks', and those of loading the model, tokenizer and dataset (OfflineModelUnavailable is an
# ImportError, as is a missing optional package).
SETUP_ERRORS = (RecipeError, ValueError, OSError, KeyError, ImportError)

__all__ = [
    "LEGACY_KEYS",
    "ParsedRecipe",
    "RecipeArguments",
    "RecipeError",
    "build_parser",
    "build_trainer",
    "check_model_path",
    "launch",
    "load_handbook_mixture",
    "load_recipe_dataset",
    "main",
    "parse_recipe",
    "run_dpo",
    "train_and_save",
    "translate_legacy",
]


USAGE = f"""usage: trl-refpo dpo --config recipe.yaml [--key value ...] [accelerate launch options]
       trl-refpo study CONFIG.yaml --output_dir DIR | trl-refpo study report DIR

Train with trl-refpo's DPOTrainer from an alignment-handbook DPO recipe (see `{PROG} --help` for every key).
Launch options (e.g. --accelerate_config zero2 --num_processes 2) run it under `accelerate launch`."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "study":
        from .study import main as study_main

        return study_main(rest, DEBUG_ENV)
    if command != "dpo":
        print(
            f"trl-refpo: error: unknown command {command!r}; the commands are 'dpo' and 'study'.\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    debug = _pop_debug_flag(rest) or bool(os.environ.get(DEBUG_ENV))
    silence_project_triggered_warnings()
    try:
        parsed = parse_recipe(rest)
        if parsed.launch_args:
            if debug:
                os.environ[DEBUG_ENV] = "1"  # for the processes `accelerate launch` starts
            return launch(parsed)
        trainer = build_trainer(parsed)
    except SETUP_ERRORS as error:
        if debug:
            raise
        # Our checks fail alike on every process of a launch: one line, from the first.
        if not isinstance(error, RecipeError) or os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    train_and_save(trainer, parsed)
    return 0


def _pop_debug_flag(argv: list[str]) -> bool:
    """Take a bare ``--debug`` out of ``argv``; ``--debug <option>`` stays (``TrainingArguments.debug``)."""
    for index, token in enumerate(argv):
        if token == "--debug" and (index + 1 == len(argv) or argv[index + 1].startswith("--")):
            del argv[index]
            return True
    return False


def _one_line(error: BaseException) -> str:
    if isinstance(error, RecipeError):
        return str(error)
    text = " ".join(str(error).split()) if not isinstance(error, KeyError) else f"missing key {error}"
    return f"{text or type(error).__name__} (--debug or {DEBUG_ENV}=1 shows the traceback)"
