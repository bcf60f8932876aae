"""The notebook really executes, top to bottom, and its assertions hold."""
from pathlib import Path

import pytest

# Installed by the project's test extra (CI); an offline GPU image may lack them.
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_explore_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "max |gam_triton - reference|" in outputs
    assert "output channels_last: True" in outputs
    assert "running means agree: True" in outputs
    # Every figure of perf/report.py the notebook calls is drawn (one PNG per figure cell).
    figure_cells = [c for c in nb.cells if c.cell_type == "code" and "report." in c.source
                    and "_figure(" in c.source]
    assert len(figure_cells) == 5
    for cell in figure_cells:
        assert any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])), cell.source
