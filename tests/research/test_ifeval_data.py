"""The prompt / on-policy pair builder on a tiny model, and the shipped data."""

import json
from collections import Counter

import pytest

from trl_refpo.research import ifeval_data
from trl_refpo.research.ifeval_data import INSTRUCTION_IDS, Reply, build, make_prompts, pick_pair
from trl_refpo.research.ifeval_judge import conflicts, judge
from trl_refpo.testing import tiny_llama, tiny_tokenizer


# commas, capitals and keywords in the vocabulary, so a random tiny model's samples pass some checks and fail others
EXTRA_WORDS = [
    ",",
    "very",
    "great",
    "simple",
    "warm",
    "BREAD",
    "IS",
    "*",
    "P.S.",
    "[day]",
    "Any",
    "other",
    "questions?",
]


def test_splits_share_no_base_task_and_heldout_is_balanced():
    train, heldout = make_prompts("train", 200), make_prompts("heldout", 300)
    assert not {row["base_task"] for row in train} & {row["base_task"] for row in heldout}
    assert len({row["base_task"] for row in heldout}) == 300
    first = Counter(row["instruction_id_list"][0] for row in heldout)
    assert set(first) == set(INSTRUCTION_IDS) and max(first.values()) - min(first.values()) <= 1
    for row in heldout:
        ids = row["instruction_id_list"]
        assert len(ids) in (1, 2) and len(row["kwargs"]) == len(ids)
        assert len(ids) == 1 or not conflicts(*ids)
    assert 0.2 < sum(len(row["instruction_id_list"]) == 2 for row in heldout) / 300 < 0.4
    assert make_prompts("heldout", 300) == heldout  # deterministic


def test_prompt_text_is_the_checkers_own_description():
    row = next(r for r in make_prompts("heldout", 300) if r["instruction_id_list"] == ["startend:end_checker"])
    assert row["prompt"].startswith(row["base_task"] + " ")
    assert f"Finish your response with this exact phrase {row['kwargs'][0]['end_phrase']}" in row["prompt"]


def test_pick_pair_takes_the_first_passing_and_the_failing_sample_closest_in_length():
    samples = [Reply("a", 30, []), Reply("b", 12, []), Reply("c", 14, []), Reply("d", 9, []), Reply("e", 16, [])]
    assert pick_pair(samples, [False, True, False, True, False]) == (1, 2)  # |14-12| = 2 beats |30-12|, |16-12|
    assert pick_pair(samples, [True] * 5) is None and pick_pair(samples, [False] * 5) is None


TINY_BUILD = dict(
    num_train_prompts=12,
    num_heldout_prompts=24,
    num_heldout_pair_prompts=6,
    num_samples=6,
    temperature=2.0,
    top_p=1.0,
    max_new_tokens=6,
    batch_size=4,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    tokenizer = tiny_tokenizer(extra_words=EXTRA_WORDS)
    model = tiny_llama(tokenizer)
    settings = dict(model_name="tiny", **TINY_BUILD)
    first, second = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    report = build(model, tokenizer, first, seed=0, **settings)
    build(model, tokenizer, second, seed=0, **settings)
    return first, second, report


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_build_pairs_chosen_passes_and_rejected_fails(tiny_build):
    folder, _, report = tiny_build
    pairs = read(folder / "ifeval_train.jsonl")
    assert report["train"]["pairs"] == len(pairs) >= 1
    dropped = report["train"]["dropped"]
    assert len(pairs) + dropped["no_passing_sample"] + dropped["no_failing_sample"] == 12
    for row in pairs:
        assert all(judge(row["chosen"], row["instruction_id_list"], row["kwargs"], row["prompt"])[0])
        assert not all(judge(row["rejected"], row["instruction_id_list"], row["kwargs"], row["prompt"])[0])
        assert {"key", "prompt", "instruction_id_list", "kwargs", "chosen", "rejected"} <= set(row)


def test_tiny_build_is_deterministic_and_writes_the_card(tiny_build):
    first, second, report = tiny_build
    for name in ("ifeval_train.jsonl", "ifeval_heldout.jsonl", "ifeval_heldout_pairs.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    train_tasks = {row["base_task"] for row in read(first / "ifeval_train.jsonl")}
    assert not train_tasks & {row["base_task"] for row in read(first / "ifeval_heldout.jsonl")}
    card = (first / "ifeval_card.md").read_text()
    assert f"{report['train']['pairs']} pairs" in card and "if-verifiable==" in card and "temperature 2.0" in card
    assert report["files"]["ifeval_train.jsonl"] in card


def test_another_seed_gives_other_samples(tmp_path):
    tokenizer = tiny_tokenizer(extra_words=EXTRA_WORDS)
    model = tiny_llama(tokenizer)
    rows = make_prompts("train", 4)
    kwargs = dict(num_samples=3, temperature=2.0, top_p=1.0, max_new_tokens=6, progress=False)
    prompts = [row["prompt"] for row in rows]
    first = ifeval_data.generate_replies(model, tokenizer, prompts, do_sample=True, seed=0, **kwargs)
    again = ifeval_data.generate_replies(model, tokenizer, prompts, do_sample=True, seed=0, **kwargs)
    other = ifeval_data.generate_replies(model, tokenizer, prompts, do_sample=True, seed=1, **kwargs)
    assert first == again and first != other


def test_worker_processes_sample_the_same_data_as_one_process(tmp_path):
    """``--workers``: each batch is reseeded, so sampling it in another process (at another thread count) gives the
    same files byte for byte."""
    tokenizer = tiny_tokenizer(extra_words=EXTRA_WORDS)
    tiny_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model, tokenizer = ifeval_data.load_policy(str(tmp_path / "model"))
    settings = dict(model_name=str(tmp_path / "model"), **TINY_BUILD)
    one = build(model, tokenizer, tmp_path / "one", seed=0, workers=1, **settings)
    two = build(model, tokenizer, tmp_path / "two", seed=0, workers=2, **settings)
    assert one["files"] == two["files"] and one["train"]["pairs"] + one["heldout_pairs"]["pairs"] >= 1
    for name in one["files"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert "(2 worker processes)" in (tmp_path / "two" / "ifeval_card.md").read_text()
    with pytest.raises(ValueError, match=r"^workers: 0; use 1"):
        build(model, tokenizer, tmp_path / "zero", seed=0, workers=0, **settings)
    other = tiny_llama(tokenizer, seed=1)  # not what model_name loads: the workers would sample another model
    with pytest.raises(ValueError, match=r"^workers: '.*model' loads other weights than the model given"):
        build(other, tokenizer, tmp_path / "other", seed=0, workers=2, **settings)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workers", "0"], "--workers 0: use 1, or more than 1 only on the CPU"),
        (["--workers", "2", "--threads", "1"], "--threads applies with --workers 1; 2 workers share the cores"),
    ],
)
def test_bad_worker_flags_are_one_line_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ifeval_data.main(["--model", "tiny", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
