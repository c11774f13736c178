"""Shared pytest set-up: offline hub, the time each notebook took under nbval, and require()."""
import collections
import importlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # a test must never wait on the Hugging Face hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_seconds = collections.defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if _seconds:
        terminalreporter.section("time per notebook (nbval)")
        for path, s in sorted(_seconds.items()):
            terminalreporter.write_line(f"{s:7.1f} s  {path}")
        terminalreporter.write_line(f"{sum(_seconds.values()):7.1f} s  in all")


def require(name):
    """Import a package that labkit depends on (bitsandbytes, accelerate, ...) for a test, and
    return it. Where it does not import, the test is skipped on a learner's machine, but fails in CI
    (CI=true): there a broken wheel must show up red, not as parity tests quietly skipped.
    Usable at a module's top (`bnb = require("bitsandbytes")`) or inside a test or fixture."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} does not import under CI ({e}); it is a dependency of labkit: "
                        "check that `pip install -e .` installed it and that its wheel fits this machine",
                        pytrace=False)
        pytest.skip(f"{name} does not import ({e}): `pip install -e .` installs it", allow_module_level=True)


def snapshot(model):
    """What a refused call must leave as it was: module types, weights, and what trains
    (tests/test_inject.py and tests/test_serving.py check that labkit refuses before it changes a model)."""
    return ([(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    import torch
    types, weights, grads = snapshot(model)
    assert types == before[0], "a refused call changed the model's modules"
    assert weights.keys() == before[1].keys() and all(torch.equal(weights[k], before[1][k]) for k in weights)
    assert grads == before[2], "a refused call changed what trains"
