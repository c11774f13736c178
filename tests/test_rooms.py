"""Each labkit module holds one chapter's idea, and reads only what the reader has met by then.

lk.CHAPTERS maps every module to the chapter that introduces it. These tests read the modules'
imports with `ast` (at module level and inside functions: `from .x import y`, `from . import x`,
`from labkit.x import y`, `import labkit.x`) and fail when a module imports one of a later chapter,
or when the imports go round in a circle; they also check the map against the notebooks, so that a
chapter starting to use a module earlier moves the module's chapter with it.
"""
import ast
import json
import re
from pathlib import Path

import labkit as lk

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "labkit"
EXEMPT = {"__init__", "exercises"}          # they serve every chapter: they may import any module

# Imports of a later chapter's module that stay for now, each with why: (importer, function, imported).
# Every entry must still be there (a fixed one is taken out of this list).
LATER_IMPORTS_KEPT = {
    ("memory", "<module>", "quant"):
        "the QLoRA line of the bill (chapters 5 to 7) prices NF4 with chapter 4's nf4_bits",
    ("finetune", "prepare", "adapters"): "chapter 8 adds its methods to finetune's runs (finetune.METHODS)",
    ("finetune", "prepare", "qinit"): "chapter 10 trains QLoRA from LoftQ's and PiSSA's starts (finetune.QLORA_STARTS)",
    ("finetune", "prepare", "prompts"): "chapter 8 adds its methods to finetune's runs (finetune.METHODS)",
    ("finetune", "checkpoint_bytes", "prompts"): "a prompt method's checkpoint is its virtual tokens (chapter 8)",
    ("finetune", "latency_per_token", "prompts"): "a prompt method is timed through labkit's decoder (chapter 8)",
}


def modules():
    """labkit's modules and sub-packages (exercises/) by name."""
    return sorted([p.stem for p in PACKAGE.glob("*.py")] + [d.name for d in PACKAGE.iterdir() if (d / "__init__.py").exists()])


def source(name):
    path = PACKAGE / f"{name}.py"
    return (path if path.exists() else PACKAGE / name / "__init__.py").read_text()


def imports(name):
    """[(function, imported module)] of labkit module `name`; function is "<module>" at module level,
    else the enclosing function's qualified name (Class.method)."""
    found = []
    labkit_modules = set(modules())

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, child.name if where == "<module>" else f"{where}.{child.name}")
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level == 1 and child.module is None:                 # from . import x, y
                    found.extend([(where, a.name) for a in child.names if a.name in labkit_modules])
                elif child.level == 1:                                        # from .x import y
                    found.append((where, child.module.split(".")[0]))
                elif child.level == 0 and (child.module or "").startswith("labkit"):
                    parts = child.module.split(".")
                    if len(parts) > 1:                                        # from labkit.x import y
                        found.append((where, parts[1]))
                    else:                                                     # from labkit import x
                        found.extend([(where, a.name) for a in child.names if a.name in labkit_modules])
            elif isinstance(child, ast.Import):
                found.extend([(where, a.name.split(".")[1]) for a in child.names if a.name.startswith("labkit.")])
            visit(child, where)

    visit(ast.parse(source(name)), "<module>")
    return [(where, m) for where, m in found if m != name]


def graph():
    return {name: sorted({m for _, m in imports(name)}) for name in modules()}


def later_imports():
    """{(importer, function, imported)} where the imported module's chapter is later than the importer's."""
    return {(name, where, m) for name in modules() if name not in EXEMPT for where, m in imports(name)
            if m not in EXEMPT and lk.CHAPTERS[m] > lk.CHAPTERS[name]}


def cycles(edges):
    """The import circles of `edges` ({module: [modules]}), each as a path that starts and ends at one module."""
    found, state = [], {}

    def walk(node, path):
        state[node] = "open"
        for nxt in edges.get(node, []):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    return found


def test_every_module_has_a_chapter():
    missing = [m for m in modules() if m not in EXEMPT and m not in lk.CHAPTERS]
    extra = [m for m in lk.CHAPTERS if m not in modules()]
    assert not missing, f"add these modules to lk.CHAPTERS (labkit/__init__.py) with the chapter that introduces them: {missing}"
    assert not extra, f"lk.CHAPTERS names modules that labkit no longer has: {extra}"


def test_no_module_imports_a_later_chapters_module():
    found = later_imports()
    new = sorted(found - set(LATER_IMPORTS_KEPT))
    assert not new, "modules that import a later chapter's module (importer, in function, imported):\n" + "\n".join(
        f"  {imp} (chapter {lk.CHAPTERS[imp]}), in {where}: {m} (chapter {lk.CHAPTERS[m]})" for imp, where, m in new)
    gone = sorted(set(LATER_IMPORTS_KEPT) - found)
    assert not gone, f"these kept imports are gone: take them out of LATER_IMPORTS_KEPT: {gone}"


def test_no_module_imports_the_checkers_or_the_package():
    offenders = [(name, where, m) for name in modules() if name not in EXEMPT for where, m in imports(name) if m in EXEMPT]
    assert not offenders, f"only the notebooks use lk.exercises and the package: {offenders}"


def test_the_imports_go_round_in_no_circle():
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_circle_finder_finds_circles():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_function_level_imports_are_read(tmp_path, monkeypatch):
    (tmp_path / "one.py").write_text("from . import two\n")
    (tmp_path / "two.py").write_text("import torch\n\ndef f():\n    from .one import g\n    from labkit.three import h\n\n"
                                     "class C:\n    def m(self):\n        from . import one, torch\n")
    (tmp_path / "three.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert imports("one") == [("<module>", "two")]
    assert imports("two") == [("f", "one"), ("f", "three"), ("C.m", "one")]
    assert cycles(graph()) == [["one", "two", "one"]]


def notebook_uses():
    """{module: first chapter whose notebook uses it}, from the code cells of notebooks/NN_*.ipynb."""
    exported = {}                                  # names reachable as lk.<name> or lk.<module>.<name>
    for name in modules():
        if name == "exercises":                    # its chN modules are chapter N's by name (test below)
            continue
        tree = ast.parse(source(name))
        for node in tree.body:                     # module-level re-exports only
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                for a in node.names:
                    exported[(name, a.asname or a.name)] = node.module.split(".")[0]
    first = {}
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        chapter = int(nb.name[:2])
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        used = set()
        aliases = {"lk": None}
        for m in re.finditer(r"from labkit import ([\w ,]+)", code):
            for part in m.group(1).split(","):
                words = part.split()
                if words and words[0] in modules():
                    used.add(words[0])
                    aliases[words[-1]] = words[0]
        used |= set(re.findall(r"(?:from|import) labkit\.(\w+)", code))
        for alias, module in aliases.items():
            for m in re.finditer(rf"\b{alias}\.(\w+)(?:\.(\w+))?", code):
                head, tail = m.group(1), m.group(2)
                if module is None and head in modules():               # lk.<module>[.<name>]
                    module_used, name = head, tail
                elif module is None:                                    # lk.<name>
                    module_used, name = exported.get(("__init__", head)), None
                else:                                                   # <alias>.<name>
                    module_used, name = module, head
                if module_used:
                    used.add(module_used)
                    if name and (module_used, name) in exported:        # lk.memory.tracked_peak is lk.measure's
                        used.add(exported[(module_used, name)])
        for module in used - EXEMPT:
            first.setdefault(module, chapter)
    return first


def test_the_chapter_map_is_where_the_notebooks_first_use_each_module():
    first = notebook_uses()
    wrong = {m: (lk.CHAPTERS.get(m), c) for m, c in first.items() if lk.CHAPTERS.get(m) != c}
    assert not wrong, f"lk.CHAPTERS against the first chapter that uses each module (map, notebooks): {wrong}"


def test_each_chapters_checkers_import_only_what_that_chapter_has_met():
    """labkit/exercises/chN.py holds chapter N's checkers: it may use labkit's modules of chapters 0 to N
    (a checker of chapter 3 that needs chapter 5's layer would check with something the reader has not met)."""
    found = []
    for path in sorted((PACKAGE / "exercises").glob("ch*.py")):
        chapter = int(path.stem[2:])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:                  # from ..x import y, from .. import x
                for m in ([node.module.split(".")[0]] if node.module else [a.name for a in node.names]):
                    if lk.CHAPTERS[m] > chapter:
                        found.append(f"{path.name} imports {m} (chapter {lk.CHAPTERS[m]})")
    assert len(list((PACKAGE / "exercises").glob("ch*.py"))) == 10
    assert not found, found
