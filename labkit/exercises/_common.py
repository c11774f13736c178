"""What every chapter's checkers share: the verdict lines (✓, not attempted), the graded() block
that a grading tool wraps them in, and the sentences that name the first wrong element."""
import contextlib

import torch


def _attempt(fn, *args):
    try:
        return True, fn(*args)
    except NotImplementedError:
        return False, None


_VERDICTS = []     # while a `graded()` block runs: one "ok" or "todo" per line a checker prints
_GRADING = []      # one entry per graded() block open; outside them nothing is recorded


def _ok(msg):
    if _GRADING:
        _VERDICTS.append("ok")
    print(f"✓ {msg}")


def _todo(name):
    if _GRADING:
        _VERDICTS.append("todo")
    print(f"… {name}: not attempted yet (replace the NotImplementedError with your code)")


@contextlib.contextmanager
def graded():
    """For a grading tool (scripts/build_assignments.py, nbgrader): the checkers run inside this block
    count only if every one of them passed. A checker already raises AssertionError on a wrong
    answer; this block also raises when a part was not attempted, or when nothing was checked.

        with lk.exercises.graded():
            lk.exercises.check_lora_linear(MyLoRALinear)
    """
    start = len(_VERDICTS)
    _GRADING.append(start)
    try:
        yield
        got = _VERDICTS[start:]
        if "todo" in got:
            raise AssertionError(f"{got.count('todo')} part(s) not attempted yet: no marks for this check")
        if not got:
            raise AssertionError("no checker ran inside graded(): nothing to give marks for")
    finally:
        _GRADING.pop()
        del _VERDICTS[start:]


def _first_wrong(got, want, atol, rtol=0.0):
    """None if got and want agree elementwise within atol + rtol * |want|; otherwise a sentence that
    names how many elements differ and the first of them: its index and both values."""
    bad = ~torch.isclose(got.double(), want.double(), rtol=rtol, atol=atol)
    if not bad.any():
        return None
    i = tuple(int(v) for v in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {bad.numel()} elements differ; the first at index {list(i)}: "
            f"yours {got[i].item():.6g}, expected {want[i].item():.6g}")


def _ratio(got, want):
    """k if got is k * want (to 1e-4 of want's norm), else None: an update scaled wrongly shows up as k != 1."""
    got, want = got.double().reshape(-1), want.double().reshape(-1)
    if want.norm() == 0:
        return None
    k = (got @ want / (want @ want)).item()
    return k if (got - k * want).norm() <= 1e-4 * want.norm() else None


def _first_diff(got, want):
    """'[i, j]: yours x, reference y' for the element where |got - want| is largest."""
    where = (got - want).abs().argmax()
    idx = list(torch.unravel_index(where, got.shape)) if got.dim() else []
    i = tuple(int(k) for k in idx)
    return f"{list(i)}: yours {got[i].item():.6g}, reference {want[i].item():.6g}"
