"""The notebooks in examples/notebooks: each runs top to bottom with small settings, its committed outputs come from
its current source, and a bad model path is one clear line.

Every notebook is a Jupytext pair: ``NN_name.py`` (the source) and ``NN_name.ipynb`` (with the outputs of a real
run, written by ``examples/notebooks/execute.py``). The kernel is this interpreter (``sys.executable``) through a
kernelspec written to a temporary folder, so the test does not depend on which ``python`` is first on PATH or on
kernelspecs installed elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import jupytext
import nbclient
import nbformat
import pytest


NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "examples" / "notebooks"
sys.path.insert(0, str(NOTEBOOK_DIR))
import execute  # noqa: E402  (examples/notebooks/execute.py: the runner that writes the committed outputs)


NOTEBOOKS = execute.SOURCES
KERNEL_NAME = "trl-refpo-test-python"
CELL_TIMEOUT_S = 300
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    """A JUPYTER_PATH folder holding one kernelspec that runs ``sys.executable -m ipykernel_launcher``."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "trl-refpo tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(root)


@pytest.fixture
def notebook_env(kernel_path, tmp_path, monkeypatch):
    """Environment the kernel inherits: small settings, outputs under tmp_path, no GUI, no hub, one thread."""
    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    monkeypatch.setenv("TRL_REFPO_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TRL_REFPO_NOTEBOOK_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: a second thread only adds contention
    # the kernel imports the same trl_refpo as the tests (a worktree on PYTHONPATH, or the installed package)
    package_root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    return tmp_path


def execute_small(name: str) -> nbformat.NotebookNode:
    """Run a notebook's source in its own folder; on a failing cell, fail with that cell's source and error."""
    try:
        return execute.execute(name, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S)
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{name}: a cell failed.\n{ANSI_ESCAPE.sub('', str(error))}", pytrace=False)


def outputs_text(notebook) -> str:
    return "\n".join(
        output.get("text", "") or output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, notebook_env, capsys):
    start = time.perf_counter()
    notebook = execute_small(name)
    with capsys.disabled():
        print(f"\n{name}: executed in {time.perf_counter() - start:.1f}s", end="")
    pngs = sorted(notebook_env.rglob("*.png"))
    assert pngs, f"{name} wrote no figure under its output folder"
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in pngs)
    if name.startswith("03_"):
        text = outputs_text(notebook)
        assert "Loaded the reference log-probs" in text  # the second precompute hit the cache


def cell_sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_the_source_cells_and_outputs_of_a_full_run(name):
    committed = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    assert cell_sources(committed) == cell_sources(jupytext.read(NOTEBOOK_DIR / f"{name}.py")), (
        f"{name}.ipynb and {name}.py differ: run python examples/notebooks/execute.py {name}"
    )
    outputs = [output for cell in committed.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"], f"{name}.ipynb stores an error"
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{name}.ipynb shows no figure"
    counts = [cell.execution_count for cell in committed.cells if cell.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{name}.ipynb: not run top to bottom in one go: {counts}"
    assert committed.metadata.get("trl_refpo", {}).get("settings") == "full", f"{name}.ipynb: not a full run"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_were_produced_by_the_current_package_code(name):
    """A warning, not a failure: a package change need not block on re-running every notebook."""
    stored = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4).metadata.get("trl_refpo", {})
    if stored.get("package_hash") != execute.package_hash():
        warnings.warn(
            f"{name}.ipynb: its outputs were produced by other trl_refpo code than the current one; "
            f"rerun: python examples/notebooks/execute.py {name}",
            UserWarning,
            stacklevel=1,
        )


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/no/such/model/folder", "MODEL = '/no/such/model/folder': does not exist (no such folder)"),
        ("offline:no-such-model", "Unknown offline model 'offline:no-such-model'"),
    ],
)
def test_missing_model_is_one_clear_line(path, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from notebook_utils import NotebookSetupError, load_model

    with pytest.raises(NotebookSetupError) as raised:
        load_model(path)
    rendered = raised.value._render_traceback_()  # what IPython shows instead of a traceback
    assert len(rendered) == 1 and "\n" not in rendered[0]
    assert expected in rendered[0] and "Set MODEL to one of" in rendered[0]


def test_folder_that_is_not_a_model_names_the_parameter(tmp_path):
    from notebook_utils import NotebookSetupError, load_model

    with pytest.raises(NotebookSetupError, match=r"^REF_MODEL = .*: is a folder without config.json: not a model"):
        load_model(str(tmp_path), parameter="REF_MODEL")


def test_notebook_with_missing_model_stops_with_one_line(notebook_env, monkeypatch):
    """The user's view: the first cell that loads the model shows one line, not a traceback."""
    monkeypatch.setenv("TRL_REFPO_NOTEBOOK_MODEL", "/no/such/model/folder")
    notebook = jupytext.read(NOTEBOOK_DIR / f"{NOTEBOOKS[0]}.py")
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        client.execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert len(errors) == 1
    assert errors[0].ename == "NotebookSetupError"
    assert errors[0].traceback == [
        "NotebookSetupError: MODEL = '/no/such/model/folder': does not exist (no such folder). Set MODEL to one of "
        "['tiny', 'tiny-bpe', 'offline:smollm2-135m-instruct', 'offline:gemma3-270m'] or to a local model folder."
    ]


def test_readme_figures_exist_and_the_command_after_each_regenerates_it():
    """Every README image under docs/images/ is a small PNG, and the first `execute.py --export NAME` after it names
    the notebook whose source saves that file (a study figure: the report command follows it and it is a copy of the
    report's own figure)."""
    readme = (NOTEBOOK_DIR.parents[1] / "README.md").read_text()
    images = list(re.finditer(r"!\[[^\]]*\]\((docs/images/[^)]+\.png)\)", readme))
    assert len(images) >= 4
    for image in images:
        path = NOTEBOOK_DIR.parents[1] / image.group(1)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 150_000, path
        if path.name.startswith("study_"):  # the study report's figure, copied: the report command follows it
            report = "trl-refpo study report examples/study/results"
            assert report in readme[image.end() : image.end() + 600], f"no `{report}` after {image.group(1)}"
            written = NOTEBOOK_DIR.parents[1] / "examples/study/results/figures" / path.name.removeprefix("study_")
            assert path.read_bytes() == written.read_bytes(), f"{path} is not a copy of {written}"
            continue
        command = re.compile(r"python examples/notebooks/execute\.py --export (\w+)").search(readme, image.end())
        assert command is not None and command.group(1) in NOTEBOOKS, f"no command after {image.group(1)}"
        source = (NOTEBOOK_DIR / f"{command.group(1)}.py").read_text()
        assert f'"{path.name}")' in source, f"{command.group(1)}.py does not save {path.name}"
