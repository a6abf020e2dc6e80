"""Bad data, references and cache files: each stops with one line naming what to fix, or is recovered from.

Numbers refer to the cases of issue 11 (config cases 1–2 are in test_config.py / test_losses.py).
"""

import copy
import math
import warnings

import pytest
import torch
from conftest import ForwardCounter, tiny_args
from datasets import IterableDataset

from trl_refpo import RefPOTrainer, losses
from trl_refpo.objectives.base import PairBatch, StepContext
from trl_refpo.objectives.registry import OBJECTIVES
from trl_refpo.testing import tiny_llama, toy_preference_dataset


COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_lengths", "ref_rejected_lengths")


def build(model, tokenizer, dataset, tmp_path, eval_dataset=None, ref_model=None, **config):
    return RefPOTrainer(
        model=copy.deepcopy(model),
        ref_model=ref_model,
        args=tiny_args(tmp_path, **config),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


# ---------------------------------------------------------------------------------------------- 2. label smoothing
@pytest.mark.parametrize("loss_type", ["alpha_dpo", "simpo"])
def test_label_smoothing_reaches_the_loss(loss_type, tmp_path):
    torch.manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (-10 * torch.rand(6, dtype=torch.float64) for _ in range(4))
    lengths = torch.full((6,), 5.0, dtype=torch.float64)
    pairs = PairBatch(
        chosen,
        rejected,
        lengths,
        lengths,
        torch.zeros(6, 3),
        torch.ones(6, 3),
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )
    ctx = StepContext(training=False, gather=lambda tensor: tensor)
    args = tiny_args(tmp_path, loss_type=loss_type, beta=2.5, label_smoothing=0.1)
    smoothed = OBJECTIVES[loss_type](args)(pairs, ctx).losses
    logits = 2.5 * ((chosen - rejected) / 5 - 0.6)  # σ = 0 before any training step: z := 0 for α-DPO
    expected = -(0.9 * torch.nn.functional.logsigmoid(logits) + 0.1 * torch.nn.functional.logsigmoid(-logits))
    torch.testing.assert_close(smoothed, expected)
    assert not torch.allclose(smoothed, losses.simpo_loss(chosen / 5, rejected / 5, 2.5, 0.6))


# ---------------------------------------------------------------------------------------------- 3. supplied columns
@pytest.mark.parametrize(
    "chosen, message",
    [
        ([-1.0, -2.0, math.nan, -1.0], "row 2 has nan"),
        ([-1.0, math.inf, -2.0, -1.0], "row 1 has inf"),
        ([-1.0, -2.0, -3.0, None], "row 3 has None"),
        (["-1", "a", "b", "c"], "row 0 has '-1' \\(string\\)"),
    ],
)
def test_supplied_reference_columns_must_be_finite_numbers(chosen, message, model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(4).add_column("ref_chosen_logps", chosen)
    dataset = dataset.add_column("ref_rejected_logps", [-1.0] * 4)
    with pytest.raises(
        ValueError, match=f"Column 'ref_chosen_logps' of the train dataset must hold finite.*{message}"
    ):
        build(model, tokenizer, dataset, tmp_path, loss_type="sigmoid")
    good = dataset.remove_columns("ref_chosen_logps").add_column("ref_chosen_logps", [-1.0] * 4)
    bad_eval = good.remove_columns("ref_rejected_logps").add_column("ref_rejected_logps", chosen)
    with pytest.raises(ValueError, match=f"Column 'ref_rejected_logps' of the eval dataset.*{message}"):
        build(model, tokenizer, good, tmp_path, eval_dataset=bad_eval, loss_type="alpha_dpo")


# ---------------------------------------------------------------------------------------------- 4. TYPO column
@pytest.mark.parametrize(
    "values, shown", [([" a b", None, " c", " d"], "row 1 has None"), ([1, 2, 3, 4], "row 0 has 1")]
)
def test_typo_reference_completion_column_names_the_bad_row(values, shown, model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(4).add_column("ref_completion", values)
    with pytest.raises(ValueError, match=f"Column 'ref_completion' of the train dataset must be a string.*{shown}"):
        build(model, tokenizer, dataset, tmp_path, loss_type="typo")


# ---------------------------------------------------------------------------------------------- 5. rows TRL drops
def test_rows_dropped_for_max_length_are_counted_and_an_empty_result_fails(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(16)
    prompt_lengths = [len(tokenizer(row["prompt"])["input_ids"]) for row in dataset]
    max_length = sorted(prompt_lengths)[len(prompt_lengths) // 2]
    dropped = sum(length >= max_length for length in prompt_lengths)
    assert 0 < dropped < 16
    with pytest.warns(
        UserWarning, match=f"Dropped {dropped} of 16 rows of the train dataset.*max_length={max_length}"
    ):
        trainer = build(model, tokenizer, dataset, tmp_path, loss_type="alpha_dpo", max_length=max_length)
    assert len(trainer.train_dataset) == 16 - dropped
    long_prompts = dataset.map(lambda row: {"prompt": "copy : a b " * 10 + row["prompt"]})
    keeps_train = max(prompt_lengths) + 1
    with pytest.raises(ValueError, match=f"All 16 rows of the eval dataset were dropped.*max_length={keeps_train}"):
        build(model, tokenizer, dataset, tmp_path, eval_dataset=long_prompts, max_length=keeps_train)


def test_empty_datasets_fail_naming_the_dataset(model, tokenizer, tmp_path):
    empty = toy_preference_dataset(4).select([])
    with pytest.raises(ValueError, match="The train dataset is empty"):
        build(model, tokenizer, empty, tmp_path)
    with pytest.raises(ValueError, match="The eval dataset is empty"):
        build(model, tokenizer, toy_preference_dataset(4), tmp_path, eval_dataset=empty, loss_type="simpo")
    with pytest.raises(ValueError, match="The train dataset is empty"):
        build(model, tokenizer, IterableDataset.from_generator(lambda: iter([])), tmp_path, max_steps=1)


# ------------------------------------------------------------------------------------------- 6. streaming + precompute
def test_precompute_with_an_iterable_dataset_fails_as_in_trl_before_scoring(model, tokenizer, tmp_path):
    rows = list(toy_preference_dataset(8))
    streaming = IterableDataset.from_generator(lambda: iter(rows))
    ref_model = tiny_llama(tokenizer, seed=1)
    counter = ForwardCounter(ref_model)
    with pytest.raises(ValueError, match="not supported with IterableDataset"):
        build(model, tokenizer, streaming, tmp_path, ref_model=ref_model, precompute_ref_log_probs=True, max_steps=1)
    assert counter.calls == 0


# ---------------------------------------------------------------------------------------------- 7. ref_model vocab
def test_in_memory_reference_with_other_embedding_count_warns_how_to_declare_its_tokenizer(model, tokenizer, tmp_path):
    padded = tiny_llama(tokenizer, seed=1, vocab_size=len(tokenizer) + 8)
    expected = f"{len(tokenizer) + 8} token embeddings and the policy {len(tokenizer)}.*ref_tokenizer="
    with pytest.warns(UserWarning, match=expected):
        build(model, tokenizer, toy_preference_dataset(4), tmp_path, ref_model=padded)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*token embeddings.*")
        build(model, tokenizer, toy_preference_dataset(4), tmp_path, ref_model=tiny_llama(tokenizer, seed=1))


# ----------------------------------------------------------------------------------------- 2. TRL fields: MoE aux loss
def test_moe_router_aux_loss_is_added_and_logged(tokenizer, tmp_path):
    """Mixtral (a third MoE family, next to tests/test_architectures.py): the loss carries
    ``router_aux_loss_coef × aux_loss`` and ``aux_loss`` is logged; a coefficient of 0 removes exactly that term."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    moe = MixtralForCausalLM(config)
    dataset = toy_preference_dataset(4)
    losses_by_coef = {}
    for coef in (0.5, 0.0):
        trainer = build(
            copy.deepcopy(moe),
            tokenizer,
            dataset,
            tmp_path / str(coef),
            loss_type="alpha_dpo",
            router_aux_loss_coef=coef,
            per_device_train_batch_size=4,
        )
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        losses_by_coef[coef] = trainer.compute_loss(trainer.model, batch).item()
        aux_logged = trainer._metrics["train"].get("aux_loss")
        assert (aux_logged is not None) == (coef > 0)
        if coef > 0:
            aux_loss = aux_logged[-1]
    assert aux_loss > 0
    assert losses_by_coef[0.5] - losses_by_coef[0.0] == pytest.approx(0.5 * aux_loss, rel=1e-4)
