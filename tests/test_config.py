"""Bad configuration fails at construction with a message naming the field."""

import pytest
from conftest import tiny_args
from trl import DPOConfig as TRLDPOConfig

from trl_refpo import RefPOTrainer, available_loss_types


NAN, INF = float("nan"), float("inf")


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
        # every float field finite and in range
        (dict(beta=NAN), "beta must be a finite number"),
        (dict(beta=INF), "beta must be a finite number"),
        (dict(loss_type="alpha_dpo", alpha=NAN), "alpha must be a finite number"),
        (dict(loss_type="alpha_dpo", gamma_beta_ratio=INF), "gamma_beta_ratio must be a finite number"),
        (dict(loss_type="alpha_dpo", gamma_beta_ratio=-0.5), "gamma_beta_ratio must be >= 0"),
        (dict(loss_type="flex_dpo", beta_chosen=NAN), "beta_chosen must be a finite number"),
        (dict(loss_type="flex_dpo", beta_rejected=-INF), "beta_rejected must be a finite number"),
        (dict(loss_type="beta_dpo", beta_dpo_alpha=NAN), "beta_dpo_alpha must be a finite number"),
        (dict(loss_type="beta_dpo", beta_dpo_alpha=-5.0), "beta_dpo_alpha must be >= 0"),
        (dict(loss_type="beta_dpo", beta_dpo_momentum=NAN), "beta_dpo_momentum must be a finite number"),
        (dict(loss_type="typo", typo_lambda=NAN), "typo_lambda must be a finite number"),
        (dict(loss_type="typo", typo_lambda=-1.0), "typo_lambda must be >= 0"),
        (dict(loss_type="typo", typo_generation_top_p=1.5), "typo_generation_top_p must be in"),
        (dict(loss_type="typo", typo_generation_temperature=INF), "typo_generation_temperature must be a finite"),
        (dict(loss_type="epsilon_dpo", epsilon=NAN), "epsilon must be a finite number"),
        (dict(loss_type="epsilon_dpo", epsilon=1.5), r"epsilon must be in \(0, 1\)"),
        (dict(loss_type=["alpha_dpo", "sft"], loss_weights=[1.0, NAN]), "loss_weights must be a finite number"),
        (dict(label_smoothing=NAN), "label_smoothing must be a finite number"),
        (dict(learning_rate=INF), "learning_rate must be a finite number"),
        # TRL fields without meaning for trl-refpo types
        (dict(loss_type="flex_dpo", label_smoothing=0.1), r"label_smoothing=0.1 has no meaning for .*\['flex_dpo'\]"),
        (dict(loss_type="typo", label_smoothing=0.1), "no meaning for loss_type"),
        (dict(loss_type="epsilon_dpo", label_smoothing=0.1), "no meaning for loss_type"),
        (dict(loss_type="beta_dpo", label_smoothing=0.1), "no meaning for loss_type"),
        (dict(loss_type=["probability", "simpo"], label_smoothing=0.1), r"\['probability'\]"),
        (dict(loss_type="simpo", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(loss_type="simpo", f_alpha_divergence_coef=0.3), "f_alpha_divergence_coef"),
        (dict(loss_type="simpo", discopop_tau=0.1), "discopop_tau"),
        (dict(loss_type="alpha_dpo", label_smoothing_factor=0.1), "label_smoothing_factor"),
        # a setting no loss type of the run reads
        (dict(loss_type="sigmoid", alpha=0.5), r"alpha=0.5 is used only by loss_type \['alpha_dpo'\]"),
        (dict(loss_type="simpo", alpha=0.5), "alpha=0.5 is used only by"),
        (dict(loss_type="sigmoid", gamma_beta_ratio=0.3), "gamma_beta_ratio=0.3 is used only by"),
        (dict(loss_type="alpha_dpo", epsilon=0.05), "epsilon=0.05 is used only by"),
        (dict(loss_type="alpha_dpo", beta_chosen=0.2), "beta_chosen=0.2 is used only by"),
        (dict(loss_type="simpo", beta_dpo_alpha=0.2), "beta_dpo_alpha=0.2 is used only by"),
        (dict(loss_type="sigmoid", typo_lambda=0.2), "typo_lambda=0.2 is used only by"),
        (dict(loss_type="typo", beta=0.5), "beta=0.5 is unused"),
        (dict(loss_type="alpha_dpo", ref_model_mixup_alpha=0.9), "ref_model_mixup_alpha applies only with sync_ref"),
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


def test_label_smoothing_accepted_where_it_applies(tmp_path):
    assert tiny_args(tmp_path, loss_type=["alpha_dpo", "sft"], label_smoothing=0.1).label_smoothing == 0.1
    assert tiny_args(tmp_path, loss_type=["simpo", "discopop"], discopop_tau=0.1).discopop_tau == 0.1
