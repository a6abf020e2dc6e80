"""Bad configuration fails at construction with a message naming the field."""

import pytest
from conftest import tiny_args
from trl import DPOConfig as TRLDPOConfig

from trl_refpo import RefPOTrainer, available_loss_types


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_type="dpo_magic"), "Unknown loss_type"),
        (dict(loss_type=["sigmoid", "nope"]), "nope"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(beta=-1.0), "beta must be > 0"),
        (dict(loss_type="flex_dpo", beta_chosen=0.0), "beta_chosen"),
        (dict(loss_type="flex_dpo", beta_rejected=-0.1), "beta_rejected"),
        (dict(loss_type="alpha_dpo", alpha=-0.5), "alpha"),
        (dict(loss_type=["alpha_dpo", "sft"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type=["alpha_dpo", "sft"], loss_weights=[1.0, -1.0]), "loss_weights"),
        (dict(loss_type="simpo", f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(loss_type="simpo", sync_ref_model=True), "sync_ref_model"),
        (dict(loss_type="beta_dpo", beta_dpo_momentum=1.0), "beta_dpo_momentum"),
        (dict(loss_type="beta_dpo", beta_dpo_filter_ratio=1.0), r"beta_dpo_filter_ratio must be in \[0, 1\)"),
        (dict(loss_type="beta_dpo", beta_dpo_filter_ratio=float("nan")), "beta_dpo_filter_ratio"),
        (dict(loss_type="alpha_dpo", moments_update="epoch"), "moments_update must be one of"),
    ],
)
def test_bad_config_raises(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_args(tmp_path, **overrides)


def test_unknown_loss_type_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        tiny_args(tmp_path, loss_type="dpo_magic")
    for name in ["sigmoid", "flex_dpo", "alpha_dpo", "simpo", "probability", "beta_dpo"]:
        assert name in str(error.value)
    assert set(available_loss_types()) >= {"sigmoid", "ipo", "sft", "alpha_dpo", "simpo"}


def test_trl_config_is_rejected_with_the_fix(model, tokenizer, dataset, tmp_path):
    args = TRLDPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    with pytest.raises(TypeError, match="from trl_refpo import DPOConfig"):
        RefPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_drop_in_names():
    import trl_refpo

    assert trl_refpo.DPOConfig is trl_refpo.RefPOConfig and trl_refpo.DPOTrainer is trl_refpo.RefPOTrainer
