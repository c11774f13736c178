"""Build the class's assignment set: one nbgrader assignment per chapter, made of its Build-it lab.

    python scripts/build_assignments.py                 # every chapter with a lab, into build/course
    python scripts/build_assignments.py --out DIR --chapters 2 3

What it writes (an nbgrader course directory, https://nbgrader.readthedocs.io):
    DIR/nbgrader_config.py
    DIR/source/chNN/chNN_build_it.ipynb    the instructor's version: the solutions' code in the lab cells
    DIR/release/chNN/chNN_build_it.ipynb   the student's version, made by `nbgrader generate_assignment`
    DIR/gradebook.db                       nbgrader's gradebook (assignments, and later grades)

One source, so that the chapters and the assignments cannot drift apart:
- the student's lab cell is the chapter's own skeleton cell, word for word (nbgrader's ClearSolutions is
  replaced by `SkeletonStub`, which puts the chapter's skeleton where the solution stood);
- the instructor's cell is the solutions notebook's cell that calls the same checker;
- the grade cells call the chapter's checkers (`lk.exercises`) inside `lk.exercises.graded()`, which
  gives the marks only when every part passed: a wrong answer raises the checker's AssertionError, an
  unattempted part raises too, and nbgrader gives a raising grade cell no marks.
Both notebooks it reads are run by nbval in the test command, and tests/test_assignments.py checks that
every student cell equals the chapter's, grades the solutions (full marks) and the untouched student
version (no marks, and no crash).

Grading a class, after students hand in DIR/submitted/<student>/chNN/chNN_build_it.ipynb (by nbgrader's
exchange on a JupyterHub, or by copying the files there):
    cd DIR && nbgrader autograde chNN && nbgrader export      # grades.csv
    cd DIR && nbgrader autograde "*"                          # every assignment, in one process
"""
import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
STUB = "raise NotImplementedError   # your code"
SCHEMA = 3                                                # nbgrader's cell metadata schema

CONFIG = '''\
# Written by scripts/build_assignments.py; edit that script, not this file.
from nbgrader.preprocessors import ClearSolutions
from nbgrader.converters.generate_assignment import GenerateAssignment

c = get_config()
c.CourseDirectory.course_id = "lora-qlora-workbook"
c.CourseDirectory.root = {root!r}
c.Execute.timeout = 600                                   # seconds a cell may take (nbgrader's default is 30)
c.ClearSolutions.code_stub = {{"python": {stub!r}}}


class SkeletonStub(ClearSolutions):
    """The student's cell is the chapter's skeleton, kept in the cell's metadata by the build script."""

    def preprocess_cell(self, cell, resources, index):
        skeleton = cell.metadata.pop("labkit_skeleton", None)
        if skeleton is not None:
            cell.source = skeleton
            return cell, resources
        return super().preprocess_cell(cell, resources, index)


c.GenerateAssignment.preprocessors = [SkeletonStub if p is ClearSolutions else p
                                      for p in GenerateAssignment.class_traits()["preprocessors"].default()]
'''


def chapter_notebooks():
    """{chapter number: (chapter notebook, solutions notebook)} for every chapter in notebooks/."""
    found = {}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        if path.stem.endswith("_solutions"):
            continue
        found[int(path.name[:2])] = (path, path.with_name(path.stem + "_solutions.ipynb"))
    return found


def _source(cell):
    return "".join(cell["source"])


def checker_calls(code):
    """The top-level `lk.exercises.check_...(...)` statements of a cell: [(checker name, call text)],
    and the code without them (trailing blank lines removed)."""
    tree = ast.parse(code)
    lines, calls, drop = code.split("\n"), [], set()
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr.startswith("check_") and ast.unparse(call.func.value) == "lk.exercises"):
            calls.append((call.func.attr, "\n".join(lines[node.lineno - 1:node.end_lineno])))
            drop.update(range(node.lineno - 1, node.end_lineno))
    rest = "\n".join(line for i, line in enumerate(lines) if i not in drop).rstrip() + "\n"
    return calls, rest


def find_lab(path):
    """The chapter's Build-it lab: (its markdown cell, [its code cells]). The lab is the code cells that
    follow a markdown cell with a "Build it:" heading and hold the skeleton's NotImplementedError."""
    cells = json.loads(path.read_text())["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown" and re.search(r"^#{2,3} Build it:", _source(cell), re.M):
            code = []
            for nxt in cells[i + 1:]:
                if nxt["cell_type"] != "code":
                    break
                code.append(nxt)
            if code and all("NotImplementedError" in _source(c) for c in code):
                return cell, code
    return None


def solution_cells(path):
    """{checker name: (solution code without the checker call)} from a solutions notebook's cells."""
    found = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code" and "lk.exercises.check_" in _source(cell):
            calls, rest = checker_calls(_source(cell))
            for name, _ in calls:
                found.setdefault(name, rest)
    return found


def setup_cell(path):
    """The solutions notebook's set-up cell (the one that imports labkit), without nbval's markers."""
    for cell in json.loads(path.read_text())["cells"]:
        code = _source(cell)
        if cell["cell_type"] == "code" and "import labkit as lk" in code:
            keep = [line for line in code.split("\n") if "NBVAL" not in line and not line.startswith("# (")]
            return "\n".join(keep).strip() + "\n"
    raise ValueError(f"{path.name}: no cell imports labkit")


def _cell(kind, source, grade_id, **nbgrader):
    meta = {"grade": False, "solution": False, "locked": True, "task": False, "grade_id": grade_id,
            "schema_version": SCHEMA, **nbgrader}
    cell = {"cell_type": kind, "metadata": {"nbgrader": meta}, "source": source, "id": grade_id.replace("_", "-")}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def assignment(chapter, chapter_nb, solutions_nb):
    """The instructor's notebook for one chapter (a dict in nbformat 4), or None when it has no lab."""
    lab = find_lab(chapter_nb)
    if lab is None:
        return None
    markdown, code_cells = lab
    solutions = solution_cells(solutions_nb)
    name = f"ch{chapter:02d}"
    title = json.loads(chapter_nb.read_text())["cells"][0]
    heading = next(line for line in _source(title).split("\n") if line.startswith("# "))
    cells = [
        _cell("markdown", f"{heading} · Build it (assignment)\n\n"
              f"Made from `notebooks/{chapter_nb.name}` by `scripts/build_assignments.py`. Write your code "
              f"in the cell that raises `NotImplementedError`, run every cell, and hand the notebook in. The "
              f"cells after yours run the chapter's checker; each gives its marks only when all of it passes.",
              f"{name}_intro"),
        _cell("code", setup_cell(solutions_nb), f"{name}_setup"),
        _cell("markdown", _source(markdown), f"{name}_lab"),
    ]
    for k, code_cell in enumerate(code_cells, 1):
        calls, skeleton = checker_calls(_source(code_cell))
        if not calls:
            raise ValueError(f"{chapter_nb.name}: a lab cell calls no lk.exercises checker")
        missing = [c for c, _ in calls if c not in solutions]
        if missing:
            raise ValueError(f"{solutions_nb.name}: no solution cell calls {', '.join(missing)}")
        solution = _cell("code", solutions[calls[0][0]], f"{name}_yours_{k}", solution=True, locked=False)
        solution["metadata"]["labkit_skeleton"] = skeleton
        cells.append(solution)
        for checker, call in calls:
            body = "\n".join("    " + line for line in call.split("\n"))
            cells.append(_cell("code", f"with lk.exercises.graded():\n{body}\n", f"{name}_{checker}",
                               grade=True, points=1))
    meta = json.loads(solutions_nb.read_text())["metadata"]
    return {"cells": cells, "metadata": {"kernelspec": meta["kernelspec"], "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def nbgrader(course, *args):
    """Run the nbgrader command line in the course directory; its output is returned (and raised on failure)."""
    bin_dir = Path(sys.executable).parent               # nbgrader calls `alembic` from the PATH: this Python's
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    exe = bin_dir / "nbgrader"
    cmd = [str(exe) if exe.exists() else "nbgrader", *args]
    done = subprocess.run(cmd, cwd=course, capture_output=True, text=True, env=env)
    if done.returncode != 0 or "Exception while loading config file" in done.stderr:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def build(out, chapters=None):
    """Write the course directory and generate the student versions; returns the assignment names."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "nbgrader_config.py").write_text(CONFIG.format(root=str(out), stub=STUB))
    names = []
    for chapter, (chapter_nb, solutions_nb) in chapter_notebooks().items():
        if chapters and chapter not in chapters:
            continue
        nb = assignment(chapter, chapter_nb, solutions_nb)
        if nb is None:
            continue
        name = f"ch{chapter:02d}"
        folder = out / "source" / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / f"{name}_build_it.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        names.append(name)
    if chapters and set(chapters) - {int(n[2:]) for n in names}:
        raise ValueError(f"no Build-it lab in chapter(s) {sorted(set(chapters) - {int(n[2:]) for n in names})}")
    for_each(out, "source", names, "generate_assignment", "--force")
    return names


def for_each(course, folder, names, command, *args):
    """nbgrader `command` for the assignments `names`: in one call (one process: each costs about 2 s
    to start) where course/folder holds exactly these assignments, else one call per name."""
    present = {p.name for p in (Path(course) / folder).glob("*") if p.is_dir()}
    if folder == "submitted":                              # submitted/<student>/<assignment>
        present = {p.name for p in (Path(course) / folder).glob("*/*") if p.is_dir()}
    if present == set(names):
        return nbgrader(course, command, "*", *args)
    return "".join(nbgrader(course, command, name, *args) for name in names)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "course"), help="the course directory (build/course)")
    ap.add_argument("--chapters", type=int, nargs="*", help="only these chapters (default: every one with a lab)")
    args = ap.parse_args()
    names = build(args.out, args.chapters)
    print(f"{len(names)} assignments in {args.out}: {', '.join(names)}")
    print(f"students' versions: {Path(args.out) / 'release'}")


if __name__ == "__main__":
    main()
