"""The repository a user clones: its own spec, licence and citation, and imports that only point down.

The floors, from the bottom: `offline/` (libraries only) < `data.py` < `mechanics/` < the concept files (torch only)
< the entry points (the trainers, eval.py, rewards.py, plot.py, speed/, tools/) < `miniature/` (the study, which
nothing imports). Read from the source with `ast`, so a lazy import inside a function counts as well."""
import ast
import re
import subprocess

import pytest

from helpers import ROOT

CONCEPT_FILES = {"losses", "schedule", "reference"}
ALLOWED_LAZY = {("train_sd15", "eval")}  # the demo's held-out report: the one documented lazy import


def tracked(pattern: str) -> list[str]:
    return subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def module_name(path: str) -> str:
    return path[:-3].replace("/", ".").removesuffix(".__init__")


def project_modules() -> dict[str, str]:
    """Every non-test module: name → path."""
    return {module_name(p): p for p in tracked("*.py")
            if not p.startswith("tests/") and not p.split("/")[-1].startswith("test_") and p != "conftest.py"}


def imports(path: str, modules) -> list[tuple[str, bool]]:
    """(project module imported, at the top level?) for each import in the file."""
    tree = ast.parse((ROOT / path).read_text(), path)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in modules:
                found.append((name, id(node) in top))
    return found


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imports(path, modules) for name, path in modules.items()}


def floor(name: str) -> int:
    """0 offline/, 1 data.py, 2 mechanics/ and the concept files (apart: neither imports the other), 3 the entry
    points, 4 the study."""
    if name.startswith("offline"):
        return 0
    if name == "data":
        return 1
    if name.startswith("mechanics") or name in CONCEPT_FILES:
        return 2
    return 4 if name.startswith("miniature") else 3


def test_the_spec_licence_and_citation_travel_with_the_code():
    files = set(tracked("*"))
    assert {"PAPER.md", "LICENSE", "CITATION.cff"} <= files
    found = subprocess.run(["git", "grep", "-n", r"\.\./shared"], cwd=ROOT, capture_output=True, text=True).stdout
    assert found == "", found
    paper = (ROOT / "PAPER.md").read_text()
    cited = set()
    for path in tracked("*.py"):
        text = (ROOT / path).read_text()
        cited |= {int(n) for n in re.findall(r"PAPER\.md §(\d)", text)}
    assert cited and all(f"§{n}" in paper for n in cited), sorted(cited)


def test_no_import_cycle(graph):
    state = {}

    def visit(name, path):
        state[name] = "open"
        for target, _ in graph[name]:
            target = target if target in graph else target.rsplit(".", 1)[0]
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " → ".join(path + [target]))
            if target in graph and target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_every_import_points_down(graph):
    for name, targets in graph.items():
        for target, at_top in targets:
            where = f"{name} imports {target}"
            assert floor(target) <= floor(name), f"upward: {where}"
            assert floor(target) < 4 or floor(name) == 4, f"the study is imported: {where}"
            if name.startswith("mechanics"):
                assert target not in CONCEPT_FILES, f"the mechanics import the method: {where}"
            if name in CONCEPT_FILES:
                assert target in CONCEPT_FILES, where
            if not at_top and floor(target) == floor(name) == 3:  # a lazy import between entry points
                assert (name, target) in ALLOWED_LAZY or target.split(".")[0] == name.split(".")[0], f"lazy: {where}"


def test_no_project_module_is_imported_by_a_string():
    """Imports a reader can follow: no importlib call naming one of the project's modules, no "module:attr"."""
    modules = project_modules()
    prefixes = {name.split(".")[0] for name in modules} | {"train_"}
    for path in modules.values():
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                    "import_module", "__import__"):
                argument = ast.unparse(node.args[0])
                assert not any(prefix in argument for prefix in prefixes), (path, argument)


def test_the_concept_files_import_torch_only():
    for name in CONCEPT_FILES:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {node.module.split(".")[0]}
            else:
                continue
            allowed = {"torch", "math", "copy", "contextlib", "typing", "dataclasses", "__future__"} | CONCEPT_FILES
            assert roots <= allowed, (name, roots)


def test_mechanics_never_end_the_process():
    for path in tracked("mechanics/*.py"):
        text = (ROOT / path).read_text()
        for word in ("sys.exit", "SystemExit", "os._exit"):
            assert word not in text, (path, word)


def test_eval_stays_small():
    assert len((ROOT / "eval.py").read_text().splitlines()) <= 850
