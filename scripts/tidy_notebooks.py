"""Make executed notebooks read well where no kernel runs (GitHub, nbviewer, a static HTML export).

    python scripts/tidy_notebooks.py notebooks/*.ipynb

- progress bars: a text bar (tqdm) writes its updates with carriage returns; only the last state
  of each line is kept, so a saved cell shows the finished bar ("100%| 12/12 ..."), not "0%";
- widgets: the saved widget state (notebook metadata "widgets") and the widget views in outputs
  are dropped; their text fallback stays. The interactive explorers of chapter 7 draw a static
  figure beside their widgets, which is what a static view shows.
Outputs are otherwise left as they are. Run it after executing a notebook (scripts/refresh_notebooks.sh).
"""
import sys

import nbformat
from nbconvert.preprocessors import CoalesceStreamsPreprocessor

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def tidy(nb):
    nb.metadata.pop("widgets", None)
    coalesce = CoalesceStreamsPreprocessor()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        coalesce.preprocess_cell(cell, {}, i)
        for out in cell.outputs:
            out.get("data", {}).pop(WIDGET_VIEW, None)
            if out.output_type == "stream":
                out.text = "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in out.text.split("\n"))
        cell.outputs = [o for o in cell.outputs if o.output_type == "stream" or o.get("data") or o.output_type == "error"]
    return nb


def main(paths):
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.write(tidy(nb), path)


if __name__ == "__main__":
    main(sys.argv[1:])
