"""The grading route (scripts/build_assignments.py, nbgrader): the student versions are the chapters'
own lab cells, nbgrader gives the solutions full marks, the untouched student version no marks without
crashing, and a typical mistake no marks with the checker's reason in the graded notebook."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import require

require("nbgrader")                              # a test extra: skipped where absent, a failure under CI

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_assignments", ROOT / "scripts" / "build_assignments.py")
ba = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ba)

# chapter 2's solution with the scaling left out: a typical mistake the checker names
MISTAKE = ("self.scaling * (x @ self.lora_A.T @ self.lora_B.T)", "(x @ self.lora_A.T @ self.lora_B.T)")


def _cells(path):
    return json.loads(Path(path).read_text())["cells"]


def _src(cell):
    return "".join(cell["source"])


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    names = ba.build(out)
    return out, names


def test_every_chapter_with_a_lab_becomes_an_assignment(course):
    out, names = course
    labs = [f"ch{c:02d}" for c, (nb, _) in ba.chapter_notebooks().items() if ba.find_lab(nb)]
    assert names == labs and len(names) >= 8, names
    assert ba.find_lab(ba.chapter_notebooks()[0][0]) is None          # chapter 0 has no lab
    with pytest.raises(ValueError, match="no Build-it lab in chapter"):
        ba.build(out / "none", chapters=[0])


def test_the_student_version_is_the_chapter_word_for_word(course):
    out, names = course
    for name in names:
        chapter_nb, _ = ba.chapter_notebooks()[int(name[2:])]
        markdown, code_cells = ba.find_lab(chapter_nb)
        release = _cells(out / "release" / name / f"{name}_build_it.ipynb")
        assert _src(markdown) in [_src(c) for c in release if c["cell_type"] == "markdown"], name
        yours = [c for c in release if c["metadata"]["nbgrader"].get("solution")]
        graded = [_src(c) for c in release if c["metadata"]["nbgrader"].get("grade")]
        assert len(yours) == len(code_cells), name
        for mine, chapter_cell in zip(yours, code_cells):
            calls, skeleton = ba.checker_calls(_src(chapter_cell))
            assert _src(mine) == skeleton, f"{name}: the student's cell differs from the chapter's skeleton"
            assert "NotImplementedError" in _src(mine) and "labkit_skeleton" not in mine["metadata"]
            for _, call in calls:                   # the chapter's own checker call, inside graded()
                assert any(call.split("(")[0] in g and g.startswith("with lk.exercises.graded():") for g in graded)
        source = _cells(out / "source" / name / f"{name}_build_it.ipynb")
        solved = [c for c in source if c["metadata"]["nbgrader"].get("solution")]
        assert all("NotImplementedError" not in _src(c) for c in solved), f"{name}: a solution still raises"


def _submit(out, student, name, notebook):
    folder = out / "submitted" / student / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(notebook, folder / f"{name}_build_it.ipynb")


def test_nbgrader_grades_solutions_full_untouched_zero_and_a_mistake_zero(course):
    from nbgrader.api import Gradebook

    out, names = course
    for name in names:
        _submit(out, "solved", name, out / "source" / name / f"{name}_build_it.ipynb")
        _submit(out, "untouched", name, out / "release" / name / f"{name}_build_it.ipynb")
    nb = json.loads((out / "source" / "ch02" / "ch02_build_it.ipynb").read_text())
    yours = next(c for c in nb["cells"] if c["metadata"]["nbgrader"].get("solution"))
    assert MISTAKE[0] in _src(yours)
    yours["source"] = _src(yours).replace(*MISTAKE)
    wrong = out / "ch02_wrong.ipynb"
    wrong.write_text(json.dumps(nb))
    _submit(out, "no_scaling", "ch02", wrong)

    ba.for_each(out, "submitted", names, "autograde")          # one nbgrader process grades them all
    with Gradebook(f"sqlite:///{out / 'gradebook.db'}") as gb:
        for name in names:
            solved, untouched = gb.find_submission(name, "solved"), gb.find_submission(name, "untouched")
            assert solved.max_score >= 1 and solved.score == solved.max_score, (name, solved.score)
            assert untouched.score == 0, (name, untouched.score)
        assert gb.find_submission("ch02", "no_scaling").score == 0

    for name in names:                              # no crash: only the grade cells raise, and they say why
        for cell in _cells(out / "autograded" / "untouched" / name / f"{name}_build_it.ipynb"):
            errors = [o for o in cell.get("outputs", []) if o["output_type"] == "error"]
            if cell["metadata"]["nbgrader"].get("grade"):
                assert errors and "not attempted yet" in errors[0]["evalue"], (name, errors)
            else:
                assert not errors, (name, cell["metadata"]["nbgrader"]["grade_id"], errors)
    graded = _cells(out / "autograded" / "no_scaling" / "ch02" / "ch02_build_it.ipynb")
    why = [o["evalue"] for c in graded for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert len(why) == 1 and "scaling" in why[0], why
