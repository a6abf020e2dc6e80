"""Which reference source a trainer uses for which settings (trl_refpo/reference/setup.py), and the rules on
reference settings that the config and the setup share (trl_refpo/reference/rules.py)."""

import copy

import pytest
from conftest import tiny_args
from datasets import Dataset

from trl_refpo import RefPOTrainer
from trl_refpo.reference.setup import setup_reference
from trl_refpo.reference.sources import ColumnReference, ModelReference, NoReference
from trl_refpo.reference.text import TextReference
from trl_refpo.testing import tiny_bpe_tokenizer, tiny_llama, toy_preference_dataset


@pytest.fixture(scope="module")
def other_tokenizer():
    return tiny_bpe_tokenizer()


def with_columns(dataset):
    return dataset.add_column("ref_chosen_logps", [-1.0] * len(dataset)).add_column(
        "ref_rejected_logps", [-2.0] * len(dataset)
    )


def setup(tmp_path, model, tokenizer, dataset=None, ref_model=None, ref_tokenizer=None, **config):
    args = tiny_args(tmp_path, **config)
    return setup_reference(
        model,
        ref_model,
        ref_tokenizer,
        tokenizer,
        args,
        dataset or toy_preference_dataset(8),
        None,
        None,
        full_distribution_for=[name for name in args.loss_type if name == "epsilon_dpo"],
    )


@pytest.mark.parametrize(
    "config, expected_source, keeps_model",
    [
        (dict(loss_type="simpo"), NoReference, False),
        (dict(loss_type="sigmoid"), ModelReference, True),  # a copy of the in-memory initial policy
        (
            dict(loss_type="flex_dpo", precompute_ref_log_probs=True),
            ModelReference,
            False,
        ),  # TRL scores with the policy
        (dict(loss_type="likelihood"), TextReference, True),  # the prior: ref_prompt='none', the policy's tokenizer
    ],
)
def test_source_for_settings(config, expected_source, keeps_model, tmp_path, model, tokenizer):
    chosen = setup(tmp_path, model, tokenizer, **config)
    assert type(chosen.source) is expected_source
    assert (chosen.ref_model is not None) == keeps_model
    if keeps_model:
        assert chosen.ref_model is not model
    if expected_source is TextReference:
        assert chosen.source.prompt_mode == "none" and chosen.source.tokenizer is tokenizer


def test_supplied_columns_are_used_as_is(tmp_path, model, tokenizer):
    chosen = setup(tmp_path, model, tokenizer, with_columns(toy_preference_dataset(8)), loss_type="sigmoid")
    assert type(chosen.source) is ColumnReference and chosen.ref_model is None


def test_a_reference_with_another_tokenizer_re_scores_the_text(tmp_path, model, tokenizer, other_tokenizer):
    ref_model = tiny_llama(other_tokenizer, seed=1)
    chosen = setup(tmp_path, model, tokenizer, ref_model=ref_model, ref_tokenizer=other_tokenizer, loss_type="sigmoid")
    assert type(chosen.source) is TextReference and chosen.source.tokenizer is other_tokenizer
    assert chosen.ref_model is ref_model and chosen.source.prompt_mode == "full"


def test_a_ref_tokenizer_that_agrees_with_the_policys_scores_the_policys_ids(tmp_path, model, tokenizer):
    ref_model = copy.deepcopy(model)
    chosen = setup(tmp_path, model, tokenizer, ref_model=ref_model, ref_tokenizer=copy.deepcopy(tokenizer))
    assert type(chosen.source) is ModelReference and chosen.ref_model is ref_model


EPSILON_WHY = "epsilon_dpo needs the reference model's full next-token distribution at every completion position"


@pytest.mark.parametrize(
    "make, detail",
    [
        (
            lambda t, m, tok, other: tiny_args(t, loss_type="epsilon_dpo", precompute_ref_log_probs=True),
            "cannot use precompute_ref_log_probs=True",
        ),
        (
            lambda t, m, tok, other: tiny_args(t, loss_type="epsilon_dpo", ref_prompt="none"),
            "cannot use the prior reference",
        ),
        (
            lambda t, m, tok, other: setup(
                t, m, tok, with_columns(toy_preference_dataset(8)), loss_type="epsilon_dpo"
            ),
            "the dataset supplies reference log-prob columns",
        ),
        (
            lambda t, m, tok, other: setup(
                t, m, tok, ref_model=tiny_llama(other, seed=1), ref_tokenizer=other, loss_type="epsilon_dpo"
            ),
            "cannot use a reference that re-tokenises the text with a different tokenizer",
        ),
    ],
    ids=["precompute", "prior", "columns", "other-tokenizer"],
)
def test_full_distribution_rule_from_the_config_and_from_the_setup(
    make, detail, tmp_path, model, tokenizer, other_tokenizer
):
    """One rule, one wording, whether the config's fields or the trainer's arguments break it."""
    with pytest.raises(ValueError, match=EPSILON_WHY) as error:
        make(tmp_path, model, tokenizer, other_tokenizer)
    assert detail in str(error.value) and "\n" not in str(error.value)


def test_sync_ref_model_with_another_tokenizer_from_the_config_and_from_the_setup(
    tmp_path, model, tokenizer, other_tokenizer
):
    message = "sync_ref_model=True copies the policy's weights into the reference"
    with pytest.raises(ValueError, match=message):
        tiny_args(tmp_path, loss_type="sigmoid", sync_ref_model=True, ref_tokenizer_name_or_path="some/tokenizer")
    with pytest.raises(ValueError, match=message):
        setup(
            tmp_path,
            model,
            tokenizer,
            ref_model=tiny_llama(other_tokenizer, seed=1),
            ref_tokenizer=other_tokenizer,
            loss_type="sigmoid",
            sync_ref_model=True,
        )


def test_offline_names_are_resolved_by_the_cli_only(tmp_path, model, tokenizer):
    with pytest.raises(
        ValueError,
        match=r"ref_model_name_or_path='offline:gemma3-270m' names an offline model, which "
        r"only the trl-refpo CLI resolves",
    ):
        setup(tmp_path, model, tokenizer, loss_type="sigmoid", ref_model_name_or_path="offline:gemma3-270m")


def test_typo_sampling_from_ref_model_reaches_the_setup_from_the_objective(tmp_path, model, tokenizer):
    """TYPO's declaration (samples_from_reference) is what lets a reference-free run take a ref_model."""
    dataset = Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 4)
    args = tiny_args(tmp_path, loss_type="typo")
    with pytest.raises(ValueError, match=r"was given ref_model=, but loss_type \['typo'\] uses no reference"):
        setup_reference(model, copy.deepcopy(model), None, tokenizer, args, dataset, None, None)
    chosen = setup_reference(
        model, copy.deepcopy(model), None, tokenizer, args, dataset, None, None, samples_from_reference=True
    )
    assert type(chosen.source) is NoReference
    with pytest.raises(ValueError, match="needs a completion sampled from the reference policy"):
        RefPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
