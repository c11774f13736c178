"""The Colab route: one address, written into every badge and install cell, and the install cell's
logic run for real (clone, set-up call, import without a restart, data found), with the set-up
itself replaced by a stand-in: the whole route, installs included, is checked by
scripts/check_colab_route.sh in a Colab-like Python 3.12 (minutes, not part of the suite)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import labkit as lk
from labkit import data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import set_repo_url  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_badge_install_cell_and_the_readme_carry_the_one_address():
    url = set_repo_url.repo_url()
    assert url.startswith("https://github.com/")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert nb.cells[0].source.startswith(set_repo_url.badge(url, path.name)), path.name
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert first_code.source == set_repo_url.install_source(url), path.name
        assert first_code.outputs == [], f"{path.name}: the install cell prints nothing outside Colab"
    readme = (ROOT / "README.md").read_text()
    assert set_repo_url.readme_line(url) in readme
    assert "<this repository>" not in readme


def test_set_repo_url_refuses_an_address_colab_cannot_open():
    with pytest.raises(SystemExit, match="Colab opens notebooks from GitHub"):
        set_repo_url.badge("https://example.org/workbook", "x.ipynb")


def test_the_install_cell_clones_calls_setup_and_imports_without_a_restart(tmp_path):
    cell = set_repo_url.install_source(set_repo_url.repo_url())
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "setup-calls.txt"
    (fake / "bash").write_text(f'#!/bin/sh\necho "$@ | $LABKIT_SYSTEM_PYTHON | $LABKIT_PYTHON | extras=[$LABKIT_EXTRAS]" >> {calls}\n')
    (fake / "bash").chmod(0o755)
    work = tmp_path / "content"
    work.mkdir()
    probe = cell + "\nimport labkit\nprint(labkit.__file__)\nprint(labkit.data.data_dir())\n" \
                   "print(len(labkit.data.load_task('people')['train']))\n"
    env = {**os.environ, "LABKIT_COLAB": "1", "LABKIT_REPO": str(ROOT), "PATH": f"{fake}:{os.environ['PATH']}"}
    env.pop("LABKIT_DATA", None)
    run = lambda: subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True)
    out = run()
    assert out.returncode == 0, out.stderr[-2000:]
    home = work / "lora-workbook"
    lines = out.stdout.strip().splitlines()
    assert lines[-3] == str(home / "labkit" / "__init__.py")          # the clone's labkit, in this process
    assert lines[-2] == str(home / "data")
    assert int(lines[-1]) == len(data.load_task("people")["train"])
    assert (home / ".git").is_dir()
    assert calls.read_text().splitlines() == [f"{home}/scripts/workbook.sh setup | 1 | {sys.executable} | extras=[]"]
    assert run().returncode == 0                                         # a second run reuses the clone
    assert len(calls.read_text().splitlines()) == 2


def test_the_install_cell_does_nothing_outside_colab(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LABKIT_COLAB"}
    cell = set_repo_url.install_source(set_repo_url.repo_url())
    out = subprocess.run([sys.executable, "-c", cell], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and list(tmp_path.iterdir()) == []


def test_data_is_found_however_labkit_was_installed(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "site-packages" / "labkit" / "data.py"))
    monkeypatch.chdir(ROOT / "notebooks")                 # a chapter run from a clone
    assert data.data_dir() == ROOT / "data"
    monkeypatch.chdir(tmp_path)                           # nowhere near a clone: a clear error
    with pytest.raises(data.DataError, match="LABKIT_DATA"):
        data.data_dir()
    monkeypatch.setenv("LABKIT_DATA", str(ROOT / "data"))
    assert lk.data.DATA_DIR == ROOT / "data"
