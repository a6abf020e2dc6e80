"""The package layout's rules (docs/design.md, "Layout"), checked on the source: imports point down only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "trl_refpo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported trl_refpo module, whether the import is inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("trl_refpo"):
                    found.append((target, in_function))
            elif isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names if alias.name.startswith("trl_refpo"))
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        ("objectives", ("reference", "heads", "trainer", "config", "research", "cli")),
        ("heads", ("reference", "objectives", "trainer", "config", "research", "cli")),
        ("reference", ("objectives", "research", "trainer", "config", "cli")),
        ("research", ("cli",)),
    ],
)
def test_wings_import_down_only(importer, forbidden):
    broken = [
        (module, target)
        for module, targets in MODULES.items()
        if wing(module) == importer
        for target, _ in targets
        if wing(target) in forbidden
    ]
    assert broken == []


def test_only_cli_and_research_import_research():
    broken = [
        (module, target)
        for module, targets in MODULES.items()
        if wing(module) not in ("cli", "research")
        for target, _ in targets
        if wing(target) == "research"
    ]
    assert broken == []


def test_no_function_level_import_of_the_package():
    """A function-level import of our own module is how a cycle gets hidden. The only ones are the CLI's dispatch to
    a subcommand's module, loaded on demand (``trl-refpo study`` needs the research extra, ``trl-refpo dpo`` does not)."""
    hidden = [(module, target) for module, targets in MODULES.items() for target, inside in targets if inside]
    assert set(hidden) == {
        ("trl_refpo.cli", "trl_refpo.cli.study"),
        ("trl_refpo.cli.study", "trl_refpo.cli.study_runner"),
    }


def test_import_loads_no_matplotlib_and_no_research_code():
    code = (
        "import sys, trl_refpo; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib'; "
        "loaded = [m for m in sys.modules if m.startswith('trl_refpo.research')]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_the_import_reader_sees_relative_and_absolute_imports():
    assert ("trl_refpo.reference.setup", False) in MODULES["trl_refpo.trainer"]
    assert ("trl_refpo.data", False) in MODULES["trl_refpo.reference.text"]  # from ..data import
    assert ("trl_refpo.research.offline_models", False) in MODULES["trl_refpo.cli.checks"]


def test_a_plain_install_requires_no_plotting_or_dataframe_library():
    import configparser

    config = configparser.ConfigParser()
    config.read(PACKAGE.parent / "setup.cfg")
    requirements = config["options"]["install_requires"].split()
    assert not [name for name in requirements if name.startswith(("matplotlib", "pandas"))]
    assert "matplotlib" in config["options.extras_require"]["research"]


def test_every_package_folder_is_a_regular_package():
    """setup.cfg's ``packages = find:`` ships only folders with an ``__init__.py``: an editable install imports a
    namespace folder, a wheel silently leaves it out."""
    folders = {path.parent for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    assert sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").exists()) == []


def test_test_files_named_in_the_docs_exist():
    """The docs point readers at test files; after a move they must point at the new paths (docs/compatibility.md
    records commands as they were run, before the layout move, and is left out)."""
    import re

    root = PACKAGE.parent
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "examples").glob("*.md"))]
    named = {
        (doc.name, path)
        for doc in docs
        if doc.name != "compatibility.md"
        for path in re.findall(r"tests/[\w/]*test_\w+\.py", doc.read_text())
    }
    assert sorted(item for item in named if not (root / item[1]).is_file()) == []
