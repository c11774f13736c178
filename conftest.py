"""Shared pytest set-up: offline hub, and the time each notebook took under nbval."""
import collections
import os

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
