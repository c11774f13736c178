"""The three set-up routes agree: workbook.sh (pip), environment.yml (conda), and the Colab cell."""
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def test_conda_installs_the_same_torch_series_as_the_pip_route():
    sh = (ROOT / "scripts" / "workbook.sh").read_text()
    pinned = re.search(r'TORCH_VERSION="\$\{LABKIT_TORCH_VERSION:-(\d+)\.(\d+)\.\d+\}"', sh)
    assert pinned, "workbook.sh no longer pins its torch version where this test looks"
    yml = (ROOT / "environment.yml").read_text()
    conda = re.search(r"^\s*- torch==(\d+)\.(\d+)\.\*\s*$", yml, re.M)
    assert conda, "environment.yml must install torch==X.Y.* through pip"
    assert conda.groups() == pinned.groups()
    assert not re.search(r"^\s*- (cpuonly|pytorch)\b", yml, re.M), "the pytorch channel's cpuonly stopped at 2.5"


def _constraints():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]


def test_the_constraints_pin_exact_versions_inside_pyprojects_bounds():
    """constraints.txt holds one exact version per package, each allowed by pyproject.toml's bounds
    (a pin outside them would make pip refuse the set-up), and both routes install under it."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    bounds = {}
    for req in declared:
        bounds.setdefault(req.name.lower(), []).append(req.specifier)
    pins = _constraints()
    names = [(p.name.lower(), str(p.marker)) for p in pins]
    assert len(set(names)) == len(names), "a package pinned twice under the same marker"
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{pin}: constraints.txt pins exact versions"
        assert pin.name.lower() != "torch", "torch is pinned by workbook.sh, and left alone where installed"
        for allowed in bounds.get(pin.name.lower(), []):
            assert allowed.contains(spec.version), f"{pin} is outside pyproject.toml's {pin.name}{allowed}"
    assert "--constraint \"$CONSTRAINTS\"" in (ROOT / "scripts" / "workbook.sh").read_text()
    assert re.search(r"^\s*- -c constraints\.txt\b", (ROOT / "environment.yml").read_text(), re.M)


@pytest.mark.skipif(os.environ.get("LABKIT_CONSTRAINTS") is not None,
                    reason="LABKIT_CONSTRAINTS chose other versions than constraints.txt")
def test_this_environment_has_the_constrained_versions():
    """What the README says the test command runs under is what it runs under. (Skipped when
    LABKIT_CONSTRAINTS chose otherwise; fails in an environment set up before a pin moved: set up again.)"""
    wrong = []
    for pin in _constraints():
        if pin.marker is not None and not pin.marker.evaluate():
            continue
        try:
            installed = metadata.version(pin.name)
        except metadata.PackageNotFoundError:
            continue                                    # an extra this environment was set up without
        if not pin.specifier.contains(installed):
            wrong.append(f"{pin.name} {installed} (constraints.txt: {pin.specifier})")
    assert not wrong, "set up again (bash scripts/workbook.sh setup): " + ", ".join(wrong)
