"""Prose and outputs kept together: every number quoted in a chapter's markdown must be one that
the chapter's own cells printed or set (allowing for rounding and for a fraction quoted as a
percentage), or be listed in tests/prose_numbers.json with the reason it may stand: a figure
cited from a paper, a setting, arithmetic done in the prose, a CPU time, or a number printed by
another chapter ("see 06_finetuning_for_real": then that chapter must print it). A new number that
nothing backs fails the suite; so does a listed number that no longer needs listing.

Left out: integers up to 20 (counts and settings: 3 seeds, 12 steps), years, code spans, link
targets, issue and pull-request numbers, and section numbers of papers ("section 4.1")."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ALLOWED = json.loads((ROOT / "tests" / "prose_numbers.json").read_text())
NUMBER = re.compile(r"(?<![\w.\-/])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w]|\.\d)")


def numbers(text):
    return [m.group(1).replace(",", "") for m in NUMBER.finditer(text)]


def spellings(number):
    """The ways a printed number may be quoted: itself, rounded to 0-3 decimals, as a percentage
    (0.873 -> 87.3%, 87%) or as a fraction of one (87.3 -> 0.873)."""
    out = {number}
    x = float(number)
    for v in (x, 100 * x, x / 100):
        out |= {f"{v:.{d}f}" for d in range(4)}
    return out


def backed(path):
    """Every spelling of every number in the notebook's code and outputs."""
    nb = json.loads(path.read_text())
    found = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        texts = ["".join(cell["source"])]
        for out in cell.get("outputs", []):
            texts.append("".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", "")))
        for text in texts:
            for n in numbers(text):
                found |= spellings(n)
    return found


def quoted(path):
    """(cell index, number) for each number in the notebook's markdown that the rules above keep."""
    nb = json.loads(path.read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        text = re.sub(r"`[^`]*`", " ", text)                          # code spans
        text = re.sub(r"\]\([^)]*\)", "]", text)                      # link targets
        text = re.sub(r"\b(?:19|20)\d{2}\b", " ", text)               # years
        text = re.sub(r"#\d+", " ", text)                             # issues and pull requests
        text = re.sub(r"sections? \d+(?:\.\d+)*(?: (?:to|and) \d+(?:\.\d+)*)?", " ", text)   # papers' sections
        for n in numbers(text):
            if "." not in n and int(n) <= 20:
                continue
            out.append((i, n))
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_quoted_number_is_printed_or_listed_with_a_reason(path):
    own = backed(path)
    listed = ALLOWED.get(path.stem, {})
    unbacked = sorted({n for _, n in quoted(path) if n not in own and n not in listed}, key=float)
    where = {n: [i for i, m in quoted(path) if m == n] for n in unbacked}
    assert not unbacked, (f"{path.name}: numbers in the prose that no cell printed or set: "
                          + ", ".join(f"{n} (cell {where[n]})" for n in unbacked)
                          + ". Quote what a cell prints, or list the number in tests/prose_numbers.json with why.")
    for n, reason in listed.items():
        assert reason.strip(), f"{path.name}: {n} is listed without a reason"
        assert n in {m for _, m in quoted(path)}, f"{path.name}: {n} is listed but no longer quoted: remove it"
        assert n not in own, f"{path.name}: {n} is listed but a cell prints it now: remove it from the list"
        if reason.startswith("see "):
            other = ROOT / "notebooks" / (reason.split()[1].rstrip(":,;.") + ".ipynb")
            assert other.exists(), f"{path.name}: {n}: {reason!r} names no notebook"
            assert n in backed(other), f"{path.name}: {n} is said to come from {other.name}, which does not print it"


def test_the_scanner_sees_what_it_should():
    assert numbers("921,600 of 135 million (0.68%) and 3.5 MiB, r=8") == ["921600", "135", "0.68", "3.5", "8"]
    assert "87" in spellings("0.8667") and "0.87" in spellings("0.8667") and "0.873" in spellings("87.3")
