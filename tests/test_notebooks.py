"""The numbered notebooks: stored as notebooks/make_notebooks.py writes them, and each one runs.

Execution uses a fresh kernel of THIS interpreter through a kernelspec installed in a temporary
directory (see ``make_notebooks.execute``), so it works on a fresh venv with only
``pip install -e .[dev]``, without ``ipykernel install``. A notebook's own ``assert``s are its
checks: any failing cell fails the test with that cell's traceback.
"""

import importlib.util
import shutil
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
_spec = importlib.util.spec_from_file_location("make_notebooks",
                                               NOTEBOOK_DIR / "make_notebooks.py")
make_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_notebooks)

NAMES = sorted(make_notebooks.NOTEBOOKS)
# A stuck cell fails the test instead of hanging CI; each notebook runs in < 30 s on 2 cores.
CELL_TIMEOUT_S = 120


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_six_numbered_notebooks_are_stored():
    """notebooks/ holds exactly 01..06 as .ipynb, the ones make_notebooks.py writes."""
    stored = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert stored == NAMES
    assert [n[:3] for n in NAMES] == ["01_", "02_", "03_", "04_", "05_", "06_"]


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_matches_its_source_and_holds_outputs(name):
    """Stored cells == build(name) cells (kind, source, id); every code cell ran without error."""
    stored = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(stored)
    built = make_notebooks.build(name)
    assert [(c.cell_type, c.source, c.id) for c in stored.cells] == \
        [(c.cell_type, c.source, c.id) for c in built.cells], \
        f"{name} is stale: run `python notebooks/make_notebooks.py {name[:2]}`"
    code = _code_cells(stored)
    assert code and all(c.execution_count is not None for c in code), \
        f"{name} was saved without running: run `python notebooks/make_notebooks.py {name[:2]}`"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)


def test_cells_from_percent_splits_and_rejects():
    """'# %%' opens code, '# %% [markdown]' opens markdown; text before a marker is an error."""
    cells = make_notebooks.cells_from_percent("# %% [markdown]\n# Title\ntext\n# %%\nx = 1\n")
    assert cells == [("markdown", "# Title\ntext"), ("code", "x = 1")]
    with pytest.raises(ValueError, match=r"cells_from_percent\(source=...\): expected the source"):
        make_notebooks.cells_from_percent("x = 1\n# %%\n")
    with pytest.raises(ValueError, match=r"expected '# %%' or '# %% \[markdown\]'"):
        make_notebooks.cells_from_percent("# %% [raw]\nx\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path):
    """Run top to bottom in a temp copy: no cell raises (so every assert in it holds)."""
    shutil.copy(NOTEBOOK_DIR / name, tmp_path / name)
    nb = nbformat.read(tmp_path / name, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    start = time.perf_counter()
    make_notebooks.execute(nb, tmp_path, timeout=CELL_TIMEOUT_S)
    seconds = time.perf_counter() - start
    code = _code_cells(nb)
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    print(f"{name}: {seconds:.1f} s")
