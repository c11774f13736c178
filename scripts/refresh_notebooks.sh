#!/usr/bin/env bash
# Execute notebooks in place, top to bottom in a fresh kernel, then tidy their saved outputs.
#   bash scripts/refresh_notebooks.sh notebooks/02_lora_layer_from_scratch.ipynb [...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LABKIT_PYTHON:-$PWD/.venv/bin/python}
for nb in "$@"; do
  echo "executing $nb"
  start=$SECONDS
  (cd "$(dirname "$nb")" && "$PY" -m jupyter nbconvert --to notebook --execute --inplace \
      --ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.record_timing=False "$(basename "$nb")")
  "$PY" scripts/tidy_notebooks.py "$nb"
  echo "  $((SECONDS - start)) s"
done
