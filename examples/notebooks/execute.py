"""Run notebooks from their Jupytext sources (``NN_name.py``) and store the outputs in the paired ``.ipynb``.

    python examples/notebooks/execute.py 01_quickstart             # one notebook, its real settings
    python examples/notebooks/execute.py --export 02_epsilon_dpo    # also rewrite its README figure in docs/images/
    python examples/notebooks/execute.py --all                      # every notebook, one after the other

The ``.py`` file is the source (edit it, or edit the ``.ipynb`` in Jupyter with the Jupytext extension, which keeps
both in step: ``jupytext.toml`` pairs them). The kernel runs in this folder and inherits the environment, so
``TRL_REFPO_NOTEBOOK_SMALL=1`` gives the tests' small settings. The written notebook records, in its metadata
``trl_refpo``, a hash of the package code (every ``.py`` under ``trl_refpo/``) it ran with; ``tests/test_notebooks.py`` warns when
that code has changed since.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import jupytext
import nbclient


NOTEBOOK_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = NOTEBOOK_DIR.parents[1] / "trl_refpo"
SOURCES = sorted(path.stem for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def package_hash() -> str:
    """sha256 over the package's Python files (names and contents): what the stored outputs were produced with."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def execute(name: str, kernel_name: str | None = None, timeout: int = 1800):
    """The notebook of ``<name>.py``, executed top to bottom in this folder (raises on the first failing cell)."""
    notebook = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name=kernel_name or notebook.metadata["kernelspec"]["name"],
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    notebook.metadata["trl_refpo"] = {
        "package_hash": package_hash(),
        "settings": "small" if os.environ.get("TRL_REFPO_NOTEBOOK_SMALL") else "full",
    }
    return notebook


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {SOURCES}")
    parser.add_argument("--all", action="store_true", help="every notebook")
    parser.add_argument("--export", action="store_true", help="also write the README figures to docs/images/")
    cli = parser.parse_args(argv)
    names = SOURCES if cli.all else cli.names
    unknown = sorted(set(names) - set(SOURCES))
    if unknown or not names:
        parser.error(f"unknown notebook {unknown}; name some of {SOURCES} or pass --all")
    if cli.export:
        os.environ["TRL_REFPO_NOTEBOOK_EXPORT"] = "1"
    for name in names:
        start = time.perf_counter()
        notebook = execute(name)
        jupytext.write(notebook, NOTEBOOK_DIR / f"{name}.ipynb", fmt="ipynb")
        print(f"{name}.ipynb: executed in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
