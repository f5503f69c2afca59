import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
# the docs build's hook executes them (one kernel per notebook, in a temporary folder); the
# executed copies are shared with tests/test_docs.py's build through `shared_tmp_path`
_spec = importlib.util.spec_from_file_location("docs_notebooks", ROOT / "docs/hooks/notebooks.py")
notebooks_hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebooks_hook)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, shared_tmp_path):
    nb = notebooks_hook.execute(path, shared_tmp_path / "notebooks")  # a raising cell fails
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert any(
        o.get("output_type") in ("stream", "display_data", "execute_result")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )


def test_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01_quickstart",
        "02_mirror_geometry",
        "03_implicit_bias",
        "04_sweeps",
        "05_conservation_laws",
        "06_saddle_to_saddle",
        "07_discrete_bias",
        "08_margins",
    ]
    nav = (ROOT / "mkdocs.yml").read_text()  # each is a page of the docs site
    assert all(f"notebooks/{n}.md" in nav for n in names)

