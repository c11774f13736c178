"""The three set-up routes agree: workbook.sh (pip), environment.yml (conda), and the Colab cell."""
import re
from pathlib import Path

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
