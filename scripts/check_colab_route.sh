#!/usr/bin/env bash
# The Colab route, checked in a Colab-like Python outside CI: Python 3.12, torch installed first (as
# Colab has it: 2.13.0 from PyPI is its CUDA build, which also runs on a CPU), with what Colab brings
# besides (transformers, accelerate, matplotlib, ipywidgets, a kernel); then chapter 0 copied outside
# the repository and run top to bottom with the Colab switch on (LABKIT_COLAB=1), so that its first
# cell clones the workbook (from LABKIT_REPO, this repository's committed HEAD by default), installs
# it into that Python and imports it without a restart. Downloads a few GB; about 10 minutes.
#
#   bash scripts/check_colab_route.sh            (PY312 names another Python 3.12; WORK the folder)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python}"
WORK="${WORK:-/tmp/colab-route}"
NB=00_why_not_full_finetuning.ipynb
rm -rf "$WORK"
mkdir -p "$WORK/content"
"$PY312" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
t0=$(date +%s)
echo "== Colab's preinstalled packages: torch 2.13.0 first, then the rest"
"$V" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$V" -m pip install -q --disable-pip-version-check transformers accelerate matplotlib ipywidgets ipykernel nbclient
"$V" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "== $(( $(date +%s) - t0 )) s; running $NB from $WORK/content with LABKIT_COLAB=1"
cp "$ROOT/notebooks/$NB" "$WORK/content/"
cd "$WORK/content"
LABKIT_COLAB=1 LABKIT_REPO="${LABKIT_REPO:-$ROOT}" LABKIT_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 "$V" - "$NB" <<'PY'
import sys, time
import nbformat
from nbclient import NotebookClient
path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
t0 = time.time()
try:
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
    error = None
except Exception as e:                      # the cell's error, with its traceback, is in its outputs
    error = f"{type(e).__name__}: {str(e)[-1500:]}"
nbformat.write(nb, path.replace(".ipynb", ".executed.ipynb"))
code = [c for c in nb.cells if c.cell_type == "code"]
ran = sum(c.execution_count is not None for c in code)
stderr = [(i, o.text.strip()[:300]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
          for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
print(f"== ran {ran} of {len(code)} code cells in {time.time() - t0:.0f} s; error: {error}")
for i, text in stderr:
    print(f"== stderr in cell {i}: {text}")
install = next(c for c in nb.cells if c.cell_type == "code")
print("== install cell output (last lines):")
for o in install.outputs:
    print("\n".join((o.get("text") or "").strip().splitlines()[-6:]))
print("== setup cell output:")
for o in code[1].outputs:
    print((o.get("text") or "").strip())
sys.exit(1 if error else 0)
PY
echo "== done in $(( $(date +%s) - t0 )) s"
