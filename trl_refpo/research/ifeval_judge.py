"""IFEval's own verdicts (Zhou et al., 2023, "Instruction-Following Evaluation for Large Language Models").

Every verdict comes from the checker registry of the PyPI package ``if-verifiable``
(``if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT``); this module only validates a row and applies
IFEval's two scoring modes, as IFEval's ``evaluation_lib`` does:

* **strict**: ``checker.check_following(reply)`` on the reply as generated (an empty reply fails);
* **loose**: the instruction passes if any of IFEval's eight variants of the reply passes (the reply, the reply
  without ``*``, without its first line, its last line, both, and those without ``*``:
  ``if_verifiable.common.get_loose_transformations``).

Unlike ``if_verifiable.common.evaluate_instructions``, which silently *skips* an unknown instruction id and lets a
checker pick random values for missing kwargs, :func:`build_checker` raises a one-line :class:`ValueError` naming the
row: an unknown id, kwargs the checker's ``build_description`` does not accept, or a required kwarg that is missing.

``langdetect`` (used by the ``change_case:english_*`` checkers) is seeded at import, so verdicts are deterministic.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import langdetect
from if_verifiable.common import get_loose_transformations
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT


langdetect.DetectorFactory.seed = 0

VERIFIER = "if-verifiable"


def verifier_version() -> str:
    return f"{VERIFIER}=={importlib.metadata.version(VERIFIER)}"


def conflicts(first: str, second: str) -> bool:
    """IFEval's conflict table, read both ways."""
    return second in INSTRUCTION_CONFLICTS.get(first, ()) or first in INSTRUCTION_CONFLICTS.get(second, ())


def build_checker(instruction_id: str, kwargs: dict[str, Any] | None, prompt: str = "", row: Any = "?"):
    """The registry's checker for ``instruction_id`` built with ``kwargs`` (``None`` values dropped, as IFEval's
    rows store every kwarg of every instruction)."""
    checker_class = INSTRUCTION_DICT.get(instruction_id)
    if checker_class is None:
        raise ValueError(
            f"row {row!r}: unknown IFEval instruction id {instruction_id!r} in instruction_id_list; "
            f"use one of if_verifiable's INSTRUCTION_DICT keys."
        )
    given = {key: value for key, value in (kwargs or {}).items() if value is not None}
    checker = checker_class(instruction_id)
    try:
        checker.build_description(**given)
    except (TypeError, ValueError) as error:
        message = str(error).replace("\n", " ")
        raise ValueError(f"row {row!r}: kwargs {given} rejected by {instruction_id!r}: {message}") from None
    required = [key for key in (checker.get_instruction_args_keys() or []) if key != "prompt"]
    missing = [key for key in required if key not in given]
    if missing:
        raise ValueError(
            f"row {row!r}: instruction {instruction_id!r} needs kwargs {missing} (the checker would pick random "
            f"values); give them in the row's kwargs."
        )
    if "prompt" in (checker.get_instruction_args() or {}):
        checker.build_description(prompt=prompt)
    return checker


def judge(reply: str, instruction_id_list, kwargs_list, prompt: str = "", row: Any = "?"):
    """``(strict, loose)``: one boolean per instruction, in order."""
    instruction_id_list = list(instruction_id_list)
    kwargs_list = list(kwargs_list)
    if not instruction_id_list:
        raise ValueError(f"row {row!r}: instruction_id_list is empty; every row needs at least one IFEval id.")
    if len(kwargs_list) != len(instruction_id_list):
        raise ValueError(
            f"row {row!r}: {len(instruction_id_list)} instruction ids but {len(kwargs_list)} kwargs entries; "
            f"give one kwargs dict per id."
        )
    variants = [variant for variant in get_loose_transformations(reply) if variant.strip()]
    strict, loose = [], []
    for instruction_id, kwargs in zip(instruction_id_list, kwargs_list):
        checker = build_checker(instruction_id, kwargs, prompt, row)
        strict.append(bool(reply.strip()) and bool(checker.check_following(reply)))
        loose.append(any(checker.check_following(variant) for variant in variants))
    return strict, loose


def validate_rows(rows) -> None:
    """Build every row's checkers once (an error names the first bad row) before any generation or training."""
    for index, row in enumerate(rows):
        key = row.get("key", index)
        if len(row["kwargs"]) != len(row["instruction_id_list"]):
            raise ValueError(f"row {key!r}: instruction_id_list and kwargs differ in length; give one kwargs per id.")
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            build_checker(instruction_id, kwargs, row.get("prompt", ""), key)
