"""Refuse to import next to a TRL (or another dependency) that trl-refpo was not tested with.

trl-refpo overrides and imports TRL internals (``docs/design.md``). A TRL release that moves one would otherwise
fail deep inside training with whatever the first missing name raises; this check fails at ``import trl_refpo``
with one line that says which package is wrong and what to install. The ranges are the tested ones
(``docs/compatibility.md``); ``setup.cfg`` states the same ranges (a test keeps them equal).
"""

from __future__ import annotations

import importlib
import inspect
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version


TRL_SERIES = "1.16"
SUPPORTED_VERSIONS = {
    "trl": f"=={TRL_SERIES}.*",
    "transformers": ">=4.56.2,<5.25",
    "accelerate": ">=1.10.1,<1.17",
    "datasets": ">=4.7.0,<5.3",
    "peft": ">=0.13.0,<0.22",
    "torch": ">=2.13,<2.14",
}
# Checked only when installed: the `deepspeed` extra.
OPTIONAL_SUPPORTED_VERSIONS = {"deepspeed": ">=0.19.8,<0.20"}

# The TRL internals trl-refpo imports or overrides: (module, attribute path).
TRL_INTERNALS = (
    ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"),
    ("trl.kernels.chunked_logprob", "TOKEN_CHUNK_SIZE"),
    ("trl.trainer.utils", "FusedCausalLMOutput"),
    ("trl.trainer.utils", "maybe_gather_lm_head_ctx"),
    ("trl.trainer.utils", "use_adapter"),
    ("trl.trainer.utils", "create_model_from_path"),
    ("trl.trainer.utils", "get_config_model_id"),
    ("trl.trainer.utils", "hash_module"),
    ("trl.trainer.utils", "pad"),
    ("trl.trainer.dpo_trainer", "DataCollatorForPreference"),
    ("trl.trainer.dpo_trainer", "create_model_from_path"),
    ("trl.data_utils", "_tokenize"),
    ("trl.data_utils", "common_prefix_length"),
    ("trl.models.utils", "disable_gradient_checkpointing"),
    ("trl.models", "prepare_deepspeed"),
    ("trl.cli.accelerate_config", "resolve_accelerate_config_argument"),
)
# The TRL methods trl-refpo overrides, with the parameters its overrides are written for.
TRL_SIGNATURES = {
    ("trl.trainer.dpo_trainer", "DPOTrainer._precompute_ref_logps"): ("self", "dataset", "name", "batch_size"),
    ("trl.trainer.dpo_trainer", "DPOTrainer._prepare_dataset"): (
        "self",
        "dataset",
        "processing_class",
        "args",
        "dataset_name",
    ),
    ("trl.trainer.dpo_trainer", "DPOTrainer._set_signature_columns_if_needed"): ("self",),
}


class IncompatibleVersionError(ImportError):
    """An installed dependency outside the range trl-refpo supports, or a TRL without an internal it uses."""


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _in_range(version: str, specifier: str) -> bool:
    return SpecifierSet(specifier).contains(Version(version), prereleases=True)


def _trl_fix(plugin_version: str) -> str:
    return f"install a trl-refpo release newer than {plugin_version} that supports it, or pip install 'trl=={TRL_SERIES}.*'"


def _check_trl(plugin_version: str) -> None:
    found = installed_version("trl")
    if found is None:
        raise IncompatibleVersionError(
            f"trl-refpo {plugin_version} needs trl {TRL_SERIES}.x, which is not installed: pip install 'trl=={TRL_SERIES}.*'"
        )
    if not _in_range(found, SUPPORTED_VERSIONS["trl"]):
        raise IncompatibleVersionError(
            f"trl-refpo {plugin_version} supports trl {TRL_SERIES}.x; found {found} — {_trl_fix(plugin_version)}"
        )


def _check_trl_internals(plugin_version: str) -> None:
    found = installed_version("trl")
    for module_name, attribute in TRL_INTERNALS:
        if _resolve(module_name, attribute) is None:
            raise IncompatibleVersionError(
                f"trl-refpo {plugin_version} needs {module_name}.{attribute}, which the installed trl {found} lacks — "
                f"{_trl_fix(plugin_version)}"
            )
    for (module_name, attribute), expected in TRL_SIGNATURES.items():
        method = _resolve(module_name, attribute)
        parameters = None if method is None else tuple(inspect.signature(method).parameters)
        if parameters != expected:
            found_text = "is missing" if method is None else f"takes ({', '.join(parameters)})"
            raise IncompatibleVersionError(
                f"trl-refpo {plugin_version} overrides {module_name}.{attribute}({', '.join(expected)}), which in the "
                f"installed trl {found} {found_text} — {_trl_fix(plugin_version)}"
            )


def _resolve(module_name: str, attribute_path: str):
    try:
        target = importlib.import_module(module_name)
    except ImportError:
        return None
    for name in attribute_path.split("."):
        target = getattr(target, name, None)
        if target is None:
            return None
    return target


def _check_dependency(plugin_version: str, package: str, specifier: str, required: bool) -> None:
    found = installed_version(package)
    if found is None:
        if required:
            raise IncompatibleVersionError(
                f"trl-refpo {plugin_version} needs {package}{specifier}, which is not installed: "
                f"pip install '{package}{specifier}'"
            )
        return
    if not _in_range(found, specifier):
        raise IncompatibleVersionError(
            f"trl-refpo {plugin_version} supports {package}{specifier}; found {found} — pip install '{package}{specifier}'"
        )


def check_installed_versions(plugin_version: str) -> None:
    """Raise :class:`IncompatibleVersionError` (one line) unless every dependency is in its supported range and TRL
    has the internals trl-refpo uses."""
    _check_trl(plugin_version)
    for package, specifier in SUPPORTED_VERSIONS.items():
        if package != "trl":
            _check_dependency(plugin_version, package, specifier, required=True)
    for package, specifier in OPTIONAL_SUPPORTED_VERSIONS.items():
        _check_dependency(plugin_version, package, specifier, required=False)
    _check_trl_internals(plugin_version)
