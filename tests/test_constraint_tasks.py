import pytest

from trl_refpo.research.constraint_tasks import (
    KINDS,
    ConstraintTask,
    check,
    check_arithmetic,
    check_comma_list,
    check_end_word,
    check_lowercase,
    check_max_words,
    check_yes_no,
    constraint_splits,
    generate_tasks,
    preference_dataset,
)


@pytest.mark.parametrize(
    "checker, response, expected",
    [
        (lambda r: check_arithmetic(r, 42), "42", True),
        (lambda r: check_arithmetic(r, 42), " 42.\n", True),
        (lambda r: check_arithmetic(r, 42), "40 + 2 = 42", False),
        (lambda r: check_arithmetic(r, 42), "43", False),
        (lambda r: check_arithmetic(r, 42), "The answer is 42.", False),
        (lambda r: check_max_words(r, 3), "Vast and deep.", True),
        (lambda r: check_max_words(r, 3), "Vast, deep and blue.", False),
        (lambda r: check_max_words(r, 3), "  ", False),
        (lambda r: check_max_words(r, 4), "it's cold, dark", True),
        (check_lowercase, "the sky is blue.", True),
        (check_lowercase, "The sky is blue.", False),
        (check_lowercase, "123.", False),
        (lambda r: check_comma_list(r, 3), "apples, bananas, oranges", True),
        (lambda r: check_comma_list(r, 3), "Apples, bananas and pears.", True),
        (lambda r: check_comma_list(r, 3), "1. Apples\n2. Bananas\n3. Oranges", False),
        (lambda r: check_comma_list(r, 3), "- apples, bananas, oranges", False),
        (lambda r: check_comma_list(r, 3), "apples, bananas, oranges, pears", False),
        (lambda r: check_comma_list(r, 4), "apples, bananas, oranges, pears", True),
        (lambda r: check_comma_list(r, 3), "Here are three fruits that grow on trees, apples, pears", False),
        (lambda r: check_end_word(r, "Done"), "The moon is pale. Done.", True),
        (lambda r: check_end_word(r, "Done"), "The moon is pale. 'done'", True),
        (lambda r: check_end_word(r, "Done"), "Done. The moon is pale.", False),
        (lambda r: check_yes_no(r, "yes"), "Yes.", True),
        (lambda r: check_yes_no(r, "yes"), "yes", True),
        (lambda r: check_yes_no(r, "yes"), "Yes, it is.", False),
        (lambda r: check_yes_no(r, "yes"), "No.", False),
    ],
)
def test_checkers(checker, response, expected):
    assert checker(response) is expected


def test_check_dispatches_on_the_task_kind():
    task = ConstraintTask("arithmetic", "What is 2 + 3? Reply with only the number.", "5", "6", {"answer": 5})
    assert check(task, "5") and not check(task, "2 + 3 = 5")


def test_generator_is_deterministic_and_covers_every_kind():
    first, second = generate_tasks(60, seed=3), generate_tasks(60, seed=3)
    assert first == second
    assert generate_tasks(60, seed=4) != first
    assert {task.kind for task in first} == set(KINDS)
    assert [task.kind for task in first[: len(KINDS)]] == list(KINDS)


def test_chosen_satisfies_and_rejected_violates_every_constraint():
    train, held_out = constraint_splits(num_train=600, num_eval=48, seed=0)
    for task in train + held_out:
        assert check(task, task.chosen), (task.instruction, task.chosen)
        assert not check(task, task.rejected), (task.instruction, task.rejected)
        assert task.chosen != task.rejected


def test_rejected_is_a_near_miss():
    """Rejected replies keep the chosen content (same answer, same words) and break only the constraint."""
    for task in generate_tasks(120, seed=1):
        if task.kind in ("lowercase", "end_word"):
            assert task.rejected.lower() in task.chosen.lower()
        if task.kind == "max_words":
            assert len(task.rejected.split()) > task.params["limit"]


def test_held_out_prompts_are_unseen_distinct_and_balanced():
    train, held_out = constraint_splits(num_train=600, num_eval=48, seed=0)
    held_out_prompts = [task.instruction for task in held_out]
    assert len(held_out) == 48 and len(set(held_out_prompts)) == 48
    assert not set(held_out_prompts) & {task.instruction for task in train}
    assert all(sum(task.kind == kind for task in held_out) == 8 for kind in KINDS)
    with pytest.raises(ValueError, match="num_eval"):
        constraint_splits(num_train=10, num_eval=600, seed=0)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="Unknown constraint kinds"):
        generate_tasks(4, kinds=("arithmetic", "haiku"))


def test_preference_dataset_is_conversational_with_a_system_prompt():
    tasks = generate_tasks(6, seed=0)
    dataset = preference_dataset(tasks)
    row = dataset[0]
    assert [message["role"] for message in row["prompt"]] == ["system", "user"]
    assert row["prompt"][1]["content"] == tasks[0].instruction
    assert row["chosen"] == [{"role": "assistant", "content": tasks[0].chosen}]
    assert row["rejected"] == [{"role": "assistant", "content": tasks[0].rejected}]
    assert len(dataset) == 6 and dataset.column_names == ["prompt", "chosen", "rejected"]
