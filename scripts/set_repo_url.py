"""Write the workbook's address into every place a learner meets it.

The address lives once, in pyproject.toml ([project.urls] Repository). This script writes it into
each chapter's "Open in Colab" badge (the first line of its first cell), each chapter's Colab
install cell (the first code cell, which does nothing outside Colab), and the README's Colab line.
tests/test_colab.py checks that they all agree.

    python scripts/set_repo_url.py                                 # rewrite from pyproject.toml
    python scripts/set_repo_url.py https://github.com/OWNER/NAME   # change the address, then rewrite
"""
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
URL_LINE = re.compile(r'^Repository = "([^"]+)"$', re.M)
BADGE = re.compile(r"^\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]\([^)]*\)\n*")
INSTALL_MARK = "# Colab only:"
INSTALL_CELL = '''# Colab only: fetch the workbook and install it with its models (about 3 minutes); elsewhere this cell does nothing.
import os, subprocess, sys
if "google.colab" in sys.modules or os.environ.get("LABKIT_COLAB") == "1":
    REPO = os.environ.get("LABKIT_REPO", "{url}")
    HOME = os.path.abspath("lora-workbook")
    if not os.path.isdir(HOME):
        subprocess.run(["git", "clone", "--depth", "1", REPO, HOME], check=True)
    # Colab's torch (CUDA) is kept; nothing its kernel has already imported is replaced
    subprocess.run(["bash", os.path.join(HOME, "scripts", "workbook.sh"), "setup"], check=True,
                   env={{**os.environ, "LABKIT_SYSTEM_PYTHON": "1", "LABKIT_PYTHON": sys.executable, "LABKIT_EXTRAS": ""}})
    sys.path.insert(0, HOME)                  # this kernel imports labkit from the clone: no restart'''
README_COLAB = re.compile(r"^!git clone \S+ lora-workbook .*$", re.M)


def repo_url():
    return URL_LINE.search(PYPROJECT.read_text()).group(1)


def badge(url, notebook):
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", url)
    if not m:
        raise SystemExit(f"{url}: Colab opens notebooks from GitHub; give https://github.com/OWNER/NAME")
    link = f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/main/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})\n\n"


def install_source(url):
    return INSTALL_CELL.format(url=url)


def readme_line(url):
    return (f"!git clone {url} lora-workbook && cd lora-workbook && "
            "LABKIT_EXTRAS= bash scripts/workbook.sh setup   # installs into Colab's Python")


def rewrite(url):
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        first.source = badge(url, path.name) + BADGE.sub("", first.source)
        code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
        if nb.cells[code].source.startswith(INSTALL_MARK):
            nb.cells[code].source = install_source(url)
        else:
            cell = nbformat.v4.new_code_cell(install_source(url))
            cell.id = "colab-install"
            nb.cells.insert(code, cell)
        nbformat.write(nb, path)
    readme = ROOT / "README.md"
    readme.write_text(README_COLAB.sub(readme_line(url).replace("\\", r"\\"), readme.read_text()))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        badge(sys.argv[1], "check")                  # refuse an address Colab cannot open
        PYPROJECT.write_text(URL_LINE.sub(f'Repository = "{sys.argv[1]}"', PYPROJECT.read_text()))
    rewrite(repo_url())
    print(f"wrote {repo_url()} into the badges, install cells and README")
