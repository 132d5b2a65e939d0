"""Rebuilds the walkthroughs: each notebooks/NN_name.py (jupytext percent format, the source we edit and review)
becomes notebooks/NN_name.ipynb, executed top to bottom so that the committed notebook shows its outputs and plots.

    python scripts/build_notebooks.py                   # every notebook
    python scripts/build_notebooks.py 04_positions      # only the ones named
    python scripts/build_notebooks.py --check           # only check that every .ipynb has the cells of its .py
"""

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
INLINE = "module://matplotlib_inline.backend_inline"  # plt.show() embeds a PNG in the cell's outputs


def cells(notebook):
    """What a notebook says, ignoring outputs and metadata: (cell type, source) per cell."""
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def sync_problems():
    """One line per .py without its .ipynb, .ipynb without its .py, or pair whose cells differ."""
    sources, ipynbs = {p.stem for p in NOTEBOOKS.glob("*.py")}, {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    problems = [f"{name}.py has no {name}.ipynb" for name in sorted(sources - ipynbs)]
    problems += [f"{name}.ipynb has no {name}.py" for name in sorted(ipynbs - sources)]
    for name in sorted(sources & ipynbs):
        ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        if cells(ipynb) != cells(jupytext.read(NOTEBOOKS / f"{name}.py")):
            problems.append(f"{name}.ipynb differs from {name}.py")
    return problems


def build(source):
    """Executes the .py in a fresh python3 kernel (working directory notebooks/) and writes the .ipynb."""
    notebook = jupytext.read(source)
    os.environ["MPLBACKEND"] = INLINE  # the kernel inherits it, even where the shell set another backend
    resources = {"metadata": {"path": str(NOTEBOOKS)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", record_timing=False, resources=resources).execute()
    # Nothing that changes from one run to the next besides the outputs themselves: stable cell ids
    # (from the cell's text), no Python patch version.
    seen = set()
    for cell in notebook.cells:
        cell.id = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:8]
        while cell.id in seen:  # two identical cells
            cell.id = hashlib.sha1(cell.id.encode()).hexdigest()[:8]
        seen.add(cell.id)
    notebook.metadata.get("language_info", {}).pop("version", None)
    jupytext.write(notebook, source.with_suffix(".ipynb"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to build, e.g. 04_positions (default: all)")
    parser.add_argument("--check", action="store_true", help="only check that each .ipynb matches its .py")
    args = parser.parse_args()
    if args.check:
        problems = sync_problems()
        print("\n".join(problems) or "every notebook matches its source")
        sys.exit(1 if problems else 0)
    sources = [NOTEBOOKS / f"{Path(name).stem}.py" for name in args.names] or sorted(NOTEBOOKS.glob("*.py"))
    for source in sources:
        start = time.perf_counter()
        build(source)
        print(f"{source.with_suffix('.ipynb').name}: executed in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
