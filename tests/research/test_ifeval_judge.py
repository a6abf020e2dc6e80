"""IFEval's verdicts through ifeval_judge: every instruction id we use, bad rows, offline."""

import os
import subprocess
import sys

import pytest
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

from trl_refpo.research.ifeval_data import EXCLUDED, INSTRUCTION_IDS
from trl_refpo.research.ifeval_judge import build_checker, judge, validate_rows


# instruction id -> (kwargs, a reply that follows it, a reply that does not)
CASES = {
    "punctuation:no_comma": ({}, "Bread is warm and soft.", "Bread is warm, soft and fresh."),
    "change_case:english_lowercase": (
        {},
        "bread is a simple food made from flour and water.",
        "Bread is a simple food made from flour and water.",
    ),
    "change_case:english_capital": (
        {},
        "BREAD IS A SIMPLE FOOD MADE FROM FLOUR AND WATER.",
        "Bread is a simple food made from flour and water.",
    ),
    "detectable_format:title": ({}, "<<Fresh Bread>>\nBread is warm.", "Fresh Bread\nBread is warm."),
    "detectable_format:json_format": ({}, '{"food": "bread", "taste": "warm"}', "Bread is warm."),
    "startend:quotation": ({}, '"Bread is warm."', "Bread is warm."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* Warm\n* Soft", "* Warm\n* Soft\n* Fresh"),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "Bread is *warm* and *soft*.",
        "Bread is *warm* and soft.",
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nBread is warm.\nSection 2\nIt is soft.",
        "Bread is warm. It is soft.",
    ),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        "Bread is warm.\nP.S. Buy some.",
        "Bread is warm. Buy some.",
    ),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Meet at [place] on [day].",
        "Meet at [place] on Monday.",
    ),
    "startend:end_checker": (
        {"end_phrase": "Any other questions?"},
        "Bread is warm. Any other questions?",
        "Any other questions? Bread is warm.",
    ),
    "keywords:existence": ({"keywords": ["simple", "warm"]}, "A simple and warm loaf.", "A simple loaf."),
    "keywords:frequency": (
        {"keyword": "warm", "frequency": 2, "relation": "at least"},
        "Warm bread is warm.",
        "Warm bread is soft.",
    ),
    "keywords:forbidden_words": ({"forbidden_words": ["very", "great"]}, "Bread is warm.", "Bread is very warm."),
    "keywords:letter_frequency": (
        {"letter": "e", "let_frequency": 3, "let_relation": "at least"},
        "Bread every week.",
        "Bread is warm.",
    ),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "less than"},
        "Bread is warm.",
        "Bread is warm and soft and fresh.",
    ),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        "Bread is warm.\n***\nIt is soft.",
        "Bread is warm. It is soft.",
    ),
}


def direct_verdict(instruction_id, kwargs, reply):
    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    checker.build_description(**kwargs)
    return bool(checker.check_following(reply))


def test_every_instruction_id_used_has_a_case_and_none_is_excluded():
    assert set(CASES) == set(INSTRUCTION_IDS)
    assert not set(EXCLUDED) & set(INSTRUCTION_IDS)
    assert len(INSTRUCTION_IDS) >= 12


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_pass_and_fail_verdicts_equal_a_direct_registry_call(instruction_id):
    kwargs, passing, failing = CASES[instruction_id]
    for reply, expected in ((passing, True), (failing, False)):
        strict, loose = judge(reply, [instruction_id], [kwargs], row="case")
        assert strict == [expected]
        assert strict[0] == direct_verdict(instruction_id, kwargs, reply)
        if expected:
            assert loose == [True]  # loose is never stricter than strict


def test_loose_removes_a_first_line_that_strict_counts():
    strict, loose = judge("Sure, here it is:\nbread is warm", ["punctuation:no_comma"], [{}])
    assert strict == [False] and loose == [True]


def test_unknown_instruction_id_is_an_error_naming_the_row():
    with pytest.raises(ValueError, match=r"row 'r7'.*unknown IFEval instruction id 'keywords:nonsense'"):
        judge("Bread.", ["keywords:nonsense"], [{}], row="r7")


def test_kwargs_the_checker_rejects_are_an_error_naming_the_row():
    with pytest.raises(ValueError, match=r"row 3: kwargs .*rejected by 'length_constraints:number_words'"):
        validate_rows(
            [
                {},
                {},
                {},
                {
                    "key": 3,
                    "prompt": "p",
                    "instruction_id_list": ["length_constraints:number_words"],
                    "kwargs": [{"num_words": 5, "relation": "about"}],
                },
            ][3:]
        )
    with pytest.raises(ValueError, match=r"row 'x'.*rejected by 'punctuation:no_comma'"):
        build_checker("punctuation:no_comma", {"num_words": 5}, row="x")


def test_missing_kwargs_are_an_error_not_a_random_value():
    with pytest.raises(ValueError, match=r"row 'x'.*needs kwargs \['relation'\]"):
        build_checker("length_constraints:number_words", {"num_words": 5}, row="x")


def test_mismatched_kwargs_length_is_an_error_naming_the_row():
    with pytest.raises(ValueError, match=r"row 'k': 2 instruction ids but 1 kwargs"):
        judge("Bread.", ["punctuation:no_comma", "startend:quotation"], [{}], row="k")


def test_the_judge_runs_offline_with_an_empty_hf_cache(tmp_path):
    code = (
        "from trl_refpo.research.ifeval_judge import judge\n"
        "from trl_refpo.research.ifeval_data import make_prompts\n"
        "rows = make_prompts('heldout', 40)\n"
        "print(sum(all(judge('bread is warm', r['instruction_id_list'], r['kwargs'], r['prompt'], r['key'])[0])"
        " for r in rows))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "NLTK_DATA": str(tmp_path / "nltk")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) > 0
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.*"))
