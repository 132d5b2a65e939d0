"""The walkthroughs in notebooks/: each NN_name.py (jupytext percent format) is the source of NN_name.ipynb,
the copy committed with its outputs. Rebuild a notebook with `python scripts/build_notebooks.py NN_name`.

* every source has its notebook and every notebook its source;
* each .ipynb has exactly the cells of its .py (types and sources; outputs and metadata are ignored), fast;
* each source runs top to bottom in a fresh kernel (its cells end with asserts); nothing is written back.
"""

import difflib
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))
NAMES = [source.stem for source in SOURCES]


def cells(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def as_lines(pairs):
    return [line for kind, source in pairs for line in [f"# <{kind} cell>\n", *f"{source}\n".splitlines(True)]]


def test_there_are_notebooks():
    assert len(SOURCES) >= 4


def test_every_source_has_its_notebook_and_back():
    ipynbs = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
    assert ipynbs == NAMES, f"notebooks/*.ipynb {ipynbs} vs notebooks/*.py {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_source(name):
    expected = cells(jupytext.read(NOTEBOOKS / f"{name}.py"))
    actual = cells(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))
    if actual != expected:
        diff = difflib.unified_diff(as_lines(expected), as_lines(actual), f"{name}.py", f"{name}.ipynb")
        pytest.fail(
            f"{name}.ipynb is out of sync with {name}.py; rebuild it with "
            f"`python scripts/build_notebooks.py {name}`:\n" + "".join(diff)[:4000]
        )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # as the build renders plots
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")  # executed in memory only
    resources = {"metadata": {"path": str(NOTEBOOKS)}}
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, at the first failing cell
