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
    assert len(rows) == 14, out.stdout
    assert all("(bound: " in row for row in rows), out.stdout          # every row says what it was judged against
    assert "14 passed, 0 failed" in out.stdout


def load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_judge_states_its_bound_and_fails_outside_it():
    """The rows a GPU run reports are only as good as their judges: each must say its bound and fail
    a measurement outside it (the latency and 7B rows used to pass whatever they measured)."""
    import torch
    g = load_script()
    assert g.judge_losses([2.0, 1.5])[0]
    assert not g.judge_losses([2.0, 2.5])[0] and not g.judge_losses([2.0, float("nan"), 1.0])[0]
    same, other = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 4]])
    assert g.judge_tokens({"reference": same, "merged": same.clone()}, "reference")[0]
    ok, detail = g.judge_tokens({"reference": same, "merged": other}, "reference")
    assert not ok and "differ from reference: merged" in detail and "bound: the same tokens" in detail
    assert g.judge_latency({"base": 1.0, "serial_adapter": 1.5}, 2.0)[0]
    ok, detail = g.judge_latency({"base": 1.0, "serial_adapter": 2.5}, 2.0)
    assert not ok and "bound: each <= 2.0 x base" in detail
    assert g.judge_step(0.2, 0.15, 3.0)[0]
    ok, detail = g.judge_step(0.5, 0.15, 3.0)
    assert not ok and "labkit / bitsandbytes + peft 3.33 (bound: <= 3.0)" in detail
    assert g.judge_ratio(100, 110)[0] and not g.judge_ratio(100, 130)[0]
    assert "bound: within 15%" in g.judge_ratio(100, 110)[1]
    assert g.judge_between(3 * 2**30, 2**30, 4 * 2**30, ("floor", "ceiling"))[0]
    ok, detail = g.judge_between(5 * 2**30, 2**30, 4 * 2**30, ("floor", "ceiling"))
    assert not ok and "bound: between floor, 1.00 GiB, and ceiling, 4.00 GiB" in detail


def test_the_checks_train_in_what_lk_amp_dtype_picks():
    """On a T4 lk.amp_dtype picks fp16 (its bf16 is only emulated): the checks that are not about one
    dtype must then run in fp16, not in a hard-coded bf16. Run here at toy size with fp16 picked."""
    import torch
    g = load_script()
    ctx = g.SimpleNamespace(device=torch.device("cpu"), small=True, amp=torch.float16)
    ctx.batch = g.fixed_batch(ctx, 4, 16, g.config("smollm2", True).vocab_size)
    picked = [(title, fn) for title, fn in g.CHECKS if title.startswith(("paged AdamW", "labkit prompt", "7B-shaped"))]
    assert len(picked) == 3
    for title, fn in picked:
        ok, detail = fn(ctx)
        assert ok and "fp16" in detail and "bf16" not in detail, (title, detail)
