"""The registry: every loss type is declared in its Objective class, and the config's rules derive from it."""

import dataclasses
import re

import pytest
from conftest import tiny_args
from trl import ModelConfig

from trl_refpo import RefPOConfig, available_loss_types
from trl_refpo.cli.errors import RecipeError
from trl_refpo.cli.legacy import translate_legacy
from trl_refpo.objectives import losses
from trl_refpo.objectives.base import FieldRange, Objective, ObjectiveOutput
from trl_refpo.objectives.loss_types import FlexDPO
from trl_refpo.objectives.registry import (
    OBJECTIVES,
    field_owners,
    field_ranges,
    needs_reference,
    reference_free_equivalent,
    register_objective,
)
from trl_refpo.objectives.trl_losses import TRL_LOSS_TYPES


TRL_DPO_FIELDS = {item.name for item in dataclasses.fields(RefPOConfig.__mro__[1])}
PLUGIN_FIELDS = {item.name for item in dataclasses.fields(RefPOConfig)} - TRL_DPO_FIELDS
REFERENCE_SOURCE_FIELDS = {
    "ref_model_name_or_path",
    "ref_model_init_kwargs",
    "ref_tokenizer_name_or_path",
    "ref_prompt",
    "ref_logps_cache_dir",
}


def test_every_plugin_field_is_declared_by_a_loss_type_or_is_a_reference_source_field():
    declared = set(field_owners())
    assert PLUGIN_FIELDS - REFERENCE_SOURCE_FIELDS == declared
    assert declared.isdisjoint(TRL_DPO_FIELDS)  # a loss type never claims one of TRL's fields


def test_every_loss_type_is_declared():
    assert set(available_loss_types()) == set(OBJECTIVES) | TRL_LOSS_TYPES
    for name, cls in OBJECTIVES.items():
        assert cls.name == name and issubclass(cls, Objective)
        for field_name, declared in cls.fields.items():
            assert declared is None or isinstance(declared, FieldRange), (name, field_name)
    assert {name for name in available_loss_types() if not needs_reference(name)} == {
        "simpo",
        "probability",
        "typo",
        "sft",
    }
    assert [name for name, cls in OBJECTIVES.items() if cls.needs_reference_distribution] == ["epsilon_dpo"]


def test_shared_fields_are_owned_by_each_declaring_type():
    owners = field_owners()
    assert owners["gamma_beta_ratio"] == ("alpha_dpo", "simpo")
    assert owners["moments_update"] == ("alpha_dpo", "beta_dpo")
    assert owners["epsilon"] == ("epsilon_dpo",)


@pytest.mark.parametrize("field_name", sorted(field_ranges()))
def test_a_declared_range_is_what_the_config_enforces(field_name, tmp_path):
    """For every declared range, a value out of it is refused with the declared wording, for an owning type."""
    declared = field_ranges()[field_name]
    owner = field_owners()[field_name][0]
    bad = next(
        value for value in (-1, 0, 1.5, "epoch") if _comparable(declared, value) and not _valid(declared, value)
    )
    with pytest.raises(ValueError) as error:
        tiny_args(tmp_path, loss_type=owner, **{field_name: bad})
    assert f"{field_name} must be {declared.expected}, got {bad!r}." in str(error.value)


def _comparable(declared, value):
    try:
        declared.is_valid(value)
        return True
    except TypeError:
        return False


def _valid(declared, value):
    return declared.is_valid(value)


@pytest.mark.parametrize("field_name", sorted(field_owners()))
def test_an_owned_field_set_without_its_loss_type_is_refused(field_name, tmp_path):
    owners = field_owners()[field_name]
    default = next(item.default for item in dataclasses.fields(RefPOConfig) if item.name == field_name)
    if isinstance(default, bool):
        other = not default
    elif isinstance(default, (int, float)):
        other = default * 0.5 if isinstance(default, float) else default + 1
    else:
        other = {None: 2, "micro_batch": "optimizer_step"}.get(default, "sample")
    with pytest.raises(ValueError, match=f"{field_name}=.* is used only by loss_type {re.escape(str(list(owners)))}"):
        tiny_args(tmp_path, loss_type="sigmoid", **{field_name: other})


class HalfSigmoid(Objective):
    """A loss type added the documented way (docs/design.md): one class, its fields, nothing else edited."""

    name = "half_sigmoid_test"
    fields = {"beta_chosen": FlexDPO.fields["beta_chosen"]}  # a shared field: the owner's declaration

    def __call__(self, pairs, ctx):
        ref_chosen, ref_rejected = pairs.reference()
        per_pair = 0.5 * losses.sigmoid_dpo_loss(
            pairs.chosen_logps, pairs.rejected_logps, ref_chosen, ref_rejected, self.args.beta
        )
        return ObjectiveOutput(per_pair, None, None)


def test_a_registered_loss_type_takes_part_in_every_rule(tmp_path):
    register_objective(HalfSigmoid)
    try:
        assert "half_sigmoid_test" in available_loss_types()
        assert field_owners()["beta_chosen"] == ("flex_dpo", "half_sigmoid_test")
        tiny_args(tmp_path, loss_type="half_sigmoid_test", beta_chosen=0.2)  # its field is its own now
        with pytest.raises(ValueError, match=r"beta_chosen must be > 0 \(or None to use beta\), got -1"):
            tiny_args(tmp_path, loss_type="half_sigmoid_test", beta_chosen=-1)
    finally:
        del OBJECTIVES["half_sigmoid_test"]
    with pytest.raises(ValueError, match="Unknown loss_type"):
        tiny_args(tmp_path, loss_type="half_sigmoid_test")


def test_register_refuses_a_name_taken_by_trl_and_a_second_range_for_a_field():
    class Shadow(HalfSigmoid):
        name = "sigmoid"

    with pytest.raises(ValueError, match="loss_type 'sigmoid' is already defined"):
        register_objective(Shadow)

    class OtherRange(HalfSigmoid):
        name = "other_range_test"
        fields = {"beta_chosen": FieldRange(lambda value: value > 1, "> 1")}

    with pytest.raises(ValueError, match="OtherRange declares another range for 'beta_chosen'"):
        register_objective(OtherRange)
    assert "other_range_test" not in OBJECTIVES


def test_legacy_reference_free_reads_the_declarations(tmp_path):
    assert reference_free_equivalent("sigmoid") == "probability"  # Probability.reference_free_variant_of
    assert reference_free_equivalent("simpo") == "simpo"
    assert reference_free_equivalent("ipo") is None
    args = tiny_args(tmp_path, loss_type=["sigmoid", "sft"])
    overrides, notes, _ = translate_legacy({"reference_free": True}, args, ModelConfig(), set())
    assert overrides["loss_type"] == ["probability", "sft"]
    with pytest.raises(RecipeError, match="no trl-refpo equivalent for loss_type 'ipo'"):
        translate_legacy({"reference_free": True}, tiny_args(tmp_path, loss_type="ipo"), ModelConfig(), set())


def test_beta_and_label_smoothing_rules_read_the_declarations(tmp_path):
    class BetaFreeSmoothed(HalfSigmoid):
        name = "beta_free_smoothed_test"
        fields = {}
        uses_beta = False
        supports_label_smoothing = True

    with pytest.raises(ValueError, match=r"beta=0.3 is unused: loss_type \['typo'\] has no β"):
        tiny_args(tmp_path, loss_type="typo", beta=0.3)
    tiny_args(tmp_path, loss_type=["typo", "sigmoid"], beta=0.3)  # sigmoid reads it
    register_objective(BetaFreeSmoothed)
    try:
        with pytest.raises(ValueError, match=r"beta=0.3 is unused: loss_type \['beta_free_smoothed_test'\]"):
            tiny_args(tmp_path, loss_type="beta_free_smoothed_test", beta=0.3)
        message = r"it applies to \['alpha_dpo', 'beta_free_smoothed_test', 'simpo'\]"
        with pytest.raises(ValueError, match=message):
            tiny_args(tmp_path, loss_type="epsilon_dpo", label_smoothing=0.1)
    finally:
        del OBJECTIVES["beta_free_smoothed_test"]
