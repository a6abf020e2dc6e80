"""The ``loss_type`` registry: names → :class:`~trl_refpo.objectives.base.Objective` classes, and every rule that
follows from their declarations.

The config (field ownership, ranges, reference needs), the CLI (legacy ``reference_free``) and the trainer read a
loss type's facts only from here, so adding a loss type touches no other module (``docs/design.md``). Rules are
derived at call time: a type added with :func:`register_objective` takes part at once.
"""

from __future__ import annotations

from .base import FieldRange, Objective
from .loss_types import AlphaDPO, BetaDPO, EpsilonDPO, FlexDPO, Likelihood, Probability, SimPO, TRLBuiltin, Typo
from .trl_losses import TRL_LOSS_TYPES, trl_type_needs_reference, trl_type_uses_beta


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (EpsilonDPO, FlexDPO, AlphaDPO, SimPO, Probability, Likelihood, BetaDPO, Typo)
}
"""trl-refpo's own loss types. Other modules register theirs with :func:`register_objective`."""


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Add a loss type (usable as a class decorator). Its name must not shadow a TRL type or another objective."""
    if cls.name in TRL_LOSS_TYPES or (cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls):
        raise ValueError(f"loss_type {cls.name!r} is already defined; give {cls.__name__} another name.")
    OBJECTIVES[cls.name] = cls
    try:
        field_ranges()
    except ValueError:
        del OBJECTIVES[cls.name]
        raise
    return cls


def available_loss_types() -> list[str]:
    """Every value ``loss_type`` accepts: TRL's built-in types and trl-refpo's."""
    return sorted(TRL_LOSS_TYPES | set(OBJECTIVES))


def build_objectives(args) -> list[Objective]:
    return [OBJECTIVES[name](args) if name in OBJECTIVES else TRLBuiltin(args, name) for name in args.loss_type]


def needs_reference(name: str) -> bool:
    return OBJECTIVES[name].needs_reference if name in OBJECTIVES else trl_type_needs_reference(name)


def uses_beta(name: str) -> bool:
    return OBJECTIVES[name].uses_beta if name in OBJECTIVES else trl_type_uses_beta(name)


def label_smoothing_types() -> list[str]:
    """trl-refpo's loss types whose authors apply conservative label smoothing."""
    return sorted(name for name, cls in OBJECTIVES.items() if cls.supports_label_smoothing)


def field_owners() -> dict[str, tuple[str, ...]]:
    """Config field → the loss types that declare it."""
    owners: dict[str, tuple[str, ...]] = {}
    for name, cls in OBJECTIVES.items():
        for field_name in cls.fields:
            owners[field_name] = (*owners.get(field_name, ()), name)
    return owners


def field_ranges() -> dict[str, FieldRange]:
    """Config field → its declared range. Two loss types declaring one field must declare the same range."""
    ranges: dict[str, FieldRange] = {}
    for cls in OBJECTIVES.values():
        for field_name, declared in cls.fields.items():
            if declared is None:
                continue
            if ranges.setdefault(field_name, declared) is not declared and ranges[field_name] != declared:
                raise ValueError(
                    f"{cls.__name__} declares another range for {field_name!r} than another loss type: a shared field "
                    "has one range; reuse that loss type's declaration."
                )
    return ranges


def reference_free_equivalent(name: str) -> str | None:
    """The reference-free loss type standing for ``name`` (itself if it is one), or None."""
    if not needs_reference(name):
        return name
    return next((other for other, cls in OBJECTIVES.items() if cls.reference_free_variant_of == name), None)


def reference_free_types() -> list[str]:
    return sorted(name for name in available_loss_types() if not needs_reference(name))
