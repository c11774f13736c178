"""The committed notebooks read well without a kernel (GitHub, nbviewer): no saved widget state,
no widget views without a static fallback, and progress bars saved in their finished state.
(scripts/refresh_notebooks.sh executes a notebook and tidies it so.)"""
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
UNFINISHED_BAR = re.compile(r"\b0%\|")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_saved_outputs_read_without_a_kernel(path):
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata, "saved widget state: run scripts/tidy_notebooks.py"
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert "application/vnd.jupyter.widget-view+json" not in data, f"cell {i}: a widget view"
            text = out.get("text", "") + str(data.get("text/plain", ""))
            assert "\r" not in text, f"cell {i}: a carriage return (an unfinished progress bar)"
            assert not UNFINISHED_BAR.search(text), f"cell {i}: a progress bar saved at 0%"
