"""scripts/gpu_check.py, on the CPU: without a GPU it says what it would run and exits 0; with
--cpu it runs every check's code at toy size, so the script that a GPU machine runs once is not
run there for the first time."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_without_a_gpu_it_explains_itself_and_exits_0():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run its checks")
    out = run()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "No CUDA device here, so nothing was run" in out.stdout
    assert "7B-shaped QLoRA step" in out.stdout and "paged AdamW" in out.stdout


def test_every_check_runs_on_the_cpu_at_toy_size():
    out = run("--cpu")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and " | ok | " in line]
    assert len(rows) == 13, out.stdout
    assert "13 passed, 0 failed" in out.stdout
