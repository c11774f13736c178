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


def _minutes(text):
    """'about 1.5 minutes', 'about 45 seconds', '~45 s', '~2.5 min' -> minutes as a float."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*(minutes?|min|seconds|s)\b", text)
    assert m, f"no time in {text!r}"
    return float(m.group(1)) / (60 if m.group(2) in ("s", "seconds") else 1)


def test_the_readme_states_each_chapters_cpu_time_as_its_header_does():
    """The README's chapter table and each notebook's first cell give the same CPU time (they drifted
    apart once: 45 s against about a minute, 3 minutes against 1.5)."""
    root = Path(__file__).resolve().parents[1]
    rows = re.findall(r"^\| (\d+) \| `(\d\d_\w+)` \|.*\| (~[^|]+) \|$", (root / "README.md").read_text(), re.M)
    assert len(rows) >= 10, "the README's chapter table is not where this test looks"
    for _, name, stated in rows:
        first = nbformat.read(root / "notebooks" / f"{name}.ipynb", as_version=4).cells[0].source
        header = re.search(r"\*\*CPU run time: ([^*]+)\*\*", first)
        assert header, f"{name}: no '**CPU run time: ...**' in its first cell"
        assert _minutes(stated) == _minutes(header.group(1)), f"{name}: README {stated!r}, header {header.group(1)!r}"
