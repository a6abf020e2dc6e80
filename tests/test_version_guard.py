"""The import-time version guard: one line naming the package, the version found and what to install."""

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
import trl.trainer.utils
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import trl_refpo
from trl_refpo import version_guard
from trl_refpo.version_guard import IncompatibleVersionError, check_installed_versions


ROOT = Path(__file__).resolve().parents[1]


def fake_versions(monkeypatch, **versions):
    real = version_guard.installed_version
    monkeypatch.setattr(version_guard, "installed_version", lambda name: versions.get(name, real(name)))


def test_installed_stack_passes():
    check_installed_versions(trl_refpo.__version__)


def test_newer_trl_is_one_line_naming_both_versions(monkeypatch):
    fake_versions(monkeypatch, trl="1.17.0")
    with pytest.raises(IncompatibleVersionError) as error:
        check_installed_versions("0.2.0")
    assert str(error.value) == (
        "trl-refpo 0.2.0 supports trl 1.16.x; found 1.17.0 — install a trl-refpo release newer than 0.2.0 that "
        "supports it, or pip install 'trl==1.16.*'"
    )


def test_older_transformers_names_the_supported_range(monkeypatch):
    fake_versions(monkeypatch, transformers="4.55.4")
    with pytest.raises(IncompatibleVersionError) as error:
        check_installed_versions("0.2.0")
    specifier = version_guard.SUPPORTED_VERSIONS["transformers"]
    assert str(error.value) == (
        f"trl-refpo 0.2.0 supports transformers{specifier}; found 4.55.4 — pip install 'transformers{specifier}'"
    )


def test_deepspeed_is_checked_only_when_installed(monkeypatch):
    fake_versions(monkeypatch, deepspeed=None)
    check_installed_versions("0.2.0")
    fake_versions(monkeypatch, deepspeed="0.18.9")
    with pytest.raises(IncompatibleVersionError, match=r"supports deepspeed>=0\.19\.8,<0\.20; found 0\.18\.9"):
        check_installed_versions("0.2.0")


def test_trl_patch_release_and_local_torch_build_pass(monkeypatch):
    fake_versions(monkeypatch, trl="1.16.3", torch="2.13.0+cpu")
    check_installed_versions("0.2.0")


def test_missing_internal_is_named(monkeypatch):
    monkeypatch.delattr(trl.trainer.utils, "FusedCausalLMOutput")
    with pytest.raises(IncompatibleVersionError) as error:
        check_installed_versions("0.2.0")
    assert str(error.value) == (
        f"trl-refpo 0.2.0 needs trl.trainer.utils.FusedCausalLMOutput, which the installed trl {trl.__version__} "
        "lacks — install a trl-refpo release newer than 0.2.0 that supports it, or pip install 'trl==1.16.*'"
    )


def test_changed_signature_of_an_overridden_method_is_named(monkeypatch):
    from trl.trainer.dpo_trainer import DPOTrainer

    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", lambda self, dataset, name: dataset)
    with pytest.raises(IncompatibleVersionError) as error:
        check_installed_versions("0.2.0")
    assert str(error.value).startswith(
        "trl-refpo 0.2.0 overrides trl.trainer.dpo_trainer.DPOTrainer._precompute_ref_logps(self, dataset, name, "
        f"batch_size), which in the installed trl {trl.__version__} takes (self, dataset, name) — "
    )


def test_import_fails_with_one_line_when_trl_is_outside_the_range():
    code = (
        "from importlib import metadata\n"
        "real = metadata.version\n"
        "metadata.version = lambda name: '1.17.0' if name == 'trl' else real(name)\n"
        "import trl_refpo\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"trl_refpo.version_guard.IncompatibleVersionError: trl-refpo {trl_refpo.__version__} supports trl 1.16.x; "
        f"found 1.17.0 — install a trl-refpo release newer than {trl_refpo.__version__} that supports it, or pip "
        "install 'trl==1.16.*'"
    )


def test_setup_cfg_states_the_guarded_ranges():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = [Requirement(line) for line in config["options"]["install_requires"].split("\n") if line.strip()]
    extras = [Requirement(line) for line in config["options.extras_require"]["deepspeed"].split("\n") if line.strip()]
    declared = {requirement.name: requirement.specifier for requirement in requirements + extras}
    guarded = {**version_guard.SUPPORTED_VERSIONS, **version_guard.OPTIONAL_SUPPORTED_VERSIONS}
    assert {name: declared[name] for name in guarded} == {name: SpecifierSet(spec) for name, spec in guarded.items()}
