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
Errors in the recipe, a model path that does not exist or a ZeRO launch without DeepSpeed installed
print one line (``trl-refpo dpo: error: ...``) and exit with status 2; set ``TRL_REFPO_DEBUG=1`` for
the traceback.
"""


from __future__ import annotations

import os
import sys

from ..offline_models import OfflineModelUnavailable
from .checks import check_model_path
from .datasets import load_handbook_mixture, load_recipe_dataset
from .errors import PROG, RecipeError
from .launch import launch
from .legacy import LEGACY_KEYS, translate_legacy
from .parsing import ParsedRecipe, RecipeArguments, build_parser, parse_recipe
from .run import run_dpo

__all__ = [
    "LEGACY_KEYS", "ParsedRecipe", "RecipeArguments", "RecipeError", "build_parser", "check_model_path",
    "launch", "load_handbook_mixture", "load_recipe_dataset", "main", "parse_recipe", "run_dpo",
    "translate_legacy",
]


USAGE = f"""usage: trl-refpo dpo --config recipe.yaml [--key value ...] [accelerate launch options]

Train with trl-refpo's DPOTrainer from an alignment-handbook DPO recipe (see `{PROG} --help` for every key).
Launch options (e.g. --accelerate_config zero2 --num_processes 2) run it under `accelerate launch`."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "dpo":
        print(f"trl-refpo: error: unknown command {command!r}; the only command is 'dpo'.\n{USAGE}", file=sys.stderr)
        return 2
    try:
        parsed = parse_recipe(rest)
        if parsed.launch_args:
            return launch(parsed)
        run_dpo(parsed)
    except (RecipeError, OfflineModelUnavailable) as error:
        if os.environ.get("TRL_REFPO_DEBUG"):
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0
