"""The library API checks its inputs before any tokenisation (issue 18, items 4–7): one line naming the dataset,
column, first bad row and what was expected; all-zero loss_weights; supplied log-probs out of range; no NaN
grad/ratio.
"""

import copy
import re

import pytest
import torch
from conftest import tiny_args
from datasets import Dataset, IterableDataset

from trl_refpo import RefPOConfig, RefPOTrainer
from trl_refpo.diagnostics import gradient_magnitude_metrics
from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset


EXPECTED = "text (a string) or chat messages (a list of dicts with 'role' and 'content')"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer)


def build(model, tokenizer, dataset, tmp_path, eval_dataset=None, **config):
    return RefPOTrainer(
        model=copy.deepcopy(model),
        args=tiny_args(tmp_path, **config),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def rows(**columns):
    return Dataset.from_dict({"prompt": [" a", " b", " c"], **columns})


TEXT = [" x", " y", " z"]
MESSAGES = [[{"role": "assistant", "content": text}] for text in TEXT]


# ---------------------------------------------------------------------------------------------- 4. dataset
@pytest.mark.parametrize("loss_type", ["sigmoid", "alpha_dpo"])  # TRL's own loss code and ours
def test_missing_column_is_named(loss_type, model, tokenizer, tmp_path):
    expected = (
        "The train dataset has no column 'rejected' (it has ['chosen', 'prompt']): a preference dataset needs "
        f"'chosen' and 'rejected' (and optionally 'prompt'), each holding {EXPECTED}. Rename or add it."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        build(model, tokenizer, rows(chosen=TEXT), tmp_path, loss_type=loss_type)


@pytest.mark.parametrize(
    "column, values, shown",
    [
        ("chosen", [" x", None, " z"], "row 1 has None"),
        ("rejected", [1, 2, 3], "row 0 has 1 (int64)"),
        ("rejected", [["a", "b"], ["c"], ["d"]], "row 0 has ['a', 'b'] (list<item: string>)"),
        ("prompt", [" a", " b", None], "row 2 has None"),
        (
            "chosen",
            [MESSAGES[0], MESSAGES[1], [{"role": "assistant", "content": "z"}, {"content": "w"}]],
            "row 2 has [{'role': 'assistant', 'content': 'z'}, {'role': None, 'content': 'w'}] "
            "(a message with no 'role')",
        ),
        ("chosen", [[{"content": t}] for t in TEXT], "row 0 has [{'content': ' x'}] (its messages have no 'role')"),
    ],
)
def test_bad_value_names_column_and_row(column, values, shown, model, tokenizer, tmp_path):
    columns = {"chosen": TEXT, "rejected": TEXT, column: values}
    if isinstance(values[0], list) and isinstance(values[0][0], dict):
        columns = {
            "prompt": [[{"role": "user", "content": t}] for t in TEXT],
            "chosen": MESSAGES,
            "rejected": MESSAGES,
            column: values,
        }
    dataset = Dataset.from_dict(columns) if "prompt" in columns else rows(**columns)
    expected = f"Column '{column}' of the train dataset must hold {EXPECTED}, but {shown}. Fix or drop that row."
    for loss_type in ("sigmoid", "simpo"):
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            build(model, tokenizer, dataset, tmp_path, loss_type=loss_type)


def test_each_eval_dataset_is_checked(model, tokenizer, tmp_path):
    good = toy_preference_dataset(4)
    bad = good.remove_columns("rejected").add_column("rejected", [None, " b", " c", " d"])
    expected = f"Column 'rejected' of the eval 'hard' dataset must hold {EXPECTED}, but row 0 has None."
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        build(model, tokenizer, good, tmp_path, eval_dataset={"easy": good, "hard": bad}, loss_type="sigmoid")
    expected = "The eval dataset has no column 'chosen'"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        build(model, tokenizer, good, tmp_path, eval_dataset=good.remove_columns("chosen"), loss_type="sigmoid")


def test_iterable_dataset_first_example_is_checked(model, tokenizer, tmp_path):
    def examples():
        yield {"prompt": " a", "chosen": " x", "rejected": 7}

    expected = f"Column 'rejected' of the train dataset must hold {EXPECTED}, but row 0 has 7 (int). Fix or drop"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        build(model, tokenizer, IterableDataset.from_generator(examples), tmp_path, loss_type="sigmoid", max_steps=1)


def test_valid_datasets_pass(model, tokenizer, tmp_path):
    for dataset in (toy_preference_dataset(4), toy_preference_dataset(4, conversational=True)):
        trainer = build(model, tokenizer, dataset, tmp_path, eval_dataset=dataset, loss_type="simpo")
        assert len(trainer.train_dataset) == 4


# ---------------------------------------------------------------------------------------------- 5. loss_weights
def test_all_zero_loss_weights_are_refused(tmp_path):
    expected = (
        "loss_weights=[0.0, 0.0] are all 0: the loss would be 0 and nothing would be trained. Give at least one of "
        "loss_type ['alpha_dpo', 'sft'] a weight > 0."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        RefPOConfig(str(tmp_path), bf16=False, loss_type=["alpha_dpo", "sft"], loss_weights=[0.0, 0.0])
    assert RefPOConfig(str(tmp_path), bf16=False, loss_type=["alpha_dpo", "sft"], loss_weights=[0.0, 1.0])


# ---------------------------------------------------------------------------------------------- 7. supplied range
@pytest.mark.parametrize(
    "value, expected",
    [
        (
            0.5,
            "Column 'ref_chosen_logps' of the train dataset holds reference log-probs, which are <= 0, but row 2 has "
            "0.5 (above the rounding tolerance 0.001): check the sign and the completion mask where it was computed.",
        ),
        (
            -1e30,
            "Column 'ref_chosen_logps' of the train dataset must hold reference log-probs >= -1e+06, but row 2 has "
            "-1e+30 (a masking fill value, not a log-prob?): recompute that row, or drop it.",
        ),
    ],
)
@pytest.mark.parametrize("loss_type", ["ipo", "flex_dpo"])
def test_supplied_log_probs_out_of_range_are_refused(value, expected, loss_type, model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(4).add_column("ref_chosen_logps", [-1.0, -2.0, value, -1.0])
    dataset = dataset.add_column("ref_rejected_logps", [-1.0] * 4)
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        build(model, tokenizer, dataset, tmp_path, loss_type=loss_type)


def test_supplied_log_probs_at_the_bounds_train(model, tokenizer, tmp_path):
    """0 (and rounding just above it) and −1e6 are accepted, and ipo's grad norm stays finite on them."""
    dataset = toy_preference_dataset(4).add_column("ref_chosen_logps", [0.0, 5e-4, -1e6, -1.0])
    dataset = dataset.add_column("ref_rejected_logps", [-1e6, -1.0, 0.0, -1.0])
    trainer = build(model, tokenizer, dataset, tmp_path, loss_type="ipo", max_steps=1)
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    assert torch.isfinite(torch.tensor(logged["grad_norm"])) and logged["grad_norm"] > 0


# ---------------------------------------------------------------------------------------------- 6. grad/ratio
def test_grad_ratio_is_left_out_when_chosen_gradient_is_zero():
    zeros = torch.zeros(4)
    assert gradient_magnitude_metrics(zeros, zeros) == {"grad/chosen_abs": 0.0, "grad/rejected_abs": 0.0}
    assert gradient_magnitude_metrics(zeros, torch.ones(4)) == {"grad/chosen_abs": 0.0, "grad/rejected_abs": 1.0}
    assert gradient_magnitude_metrics(torch.full((4,), 2.0), -torch.ones(4)) == {
        "grad/chosen_abs": 2.0,
        "grad/rejected_abs": 1.0,
        "grad/ratio": 0.5,
    }


def test_saturated_beta_dpo_logs_no_nan(model, tokenizer, tmp_path):
    """A 1000-nat supplied reference gap saturates every pair: both gradients are 0 and no metric is NaN."""
    dataset = toy_preference_dataset(8).add_column("ref_chosen_logps", [-1000.0] * 8)
    dataset = dataset.add_column("ref_rejected_logps", [0.0] * 8)
    trainer = build(model, tokenizer, dataset, tmp_path, loss_type="beta_dpo", max_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["grad/chosen_abs"] == 0.0 and entry["grad/rejected_abs"] == 0.0
        assert "grad/ratio" not in entry
        assert all(value == value for value in entry.values() if isinstance(value, float))  # no NaN
