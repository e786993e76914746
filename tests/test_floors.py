"""The floors of the house (docs/ARCHITECTURE.md, "Floors"): what may import what, and no import circle.

    utils/                          imports nothing of ntt but utils/ (and `ntt` itself, for __version__)
    the method                      ntt/*.py (refs, memory, bank, proposals, matching, postprocess, inference,
                                    maskcache, prompts, results, ops) and backbones/, data/, eval/: imports
                                    the method and utils/ only, never a wing
    the wings                       runner/, app/, tools/, prepare/, report/: import the method, utils/
                                    and their own modules; another wing only through its package
                                    (`from ntt.runner import X`), never its modules
    the front door                  ntt/cli.py, ntt/__main__.py, ntt/__init__.py: may reach everything

Every import counts, at module level or inside a function (a lazy import is still a dependency), and an
import circle between modules fails however it is spread.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

WINGS = ("runner", "app", "tools", "prepare", "report")
METHOD_FOLDERS = ("backbones", "data", "eval")
FRONT_DOOR = ("ntt", "ntt.cli", "ntt.__main__")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (every `import`, at any depth of the code)."""
    root = package_dir.parent
    top = package_dir.name
    files = {module_name(p, root): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        targets: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".")
                    anchor = anchor if is_pkg else anchor[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from ntt.runner import lines` imports the module ntt.runner.lines
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `import ntt.runner.lines.x` -> the module it names
                    name = name.rpartition(".")[0]
                if name and (name == top or name.startswith(top + ".")) and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def layer(mod: str) -> str:
    """`front`, `utils`, `method` or `wing:<name>` of a module of the ntt package."""
    if mod in FRONT_DOOR:
        return "front"
    parts = mod.split(".")
    if len(parts) > 1 and parts[1] == "utils":
        return "utils"
    if len(parts) > 1 and parts[1] in WINGS:
        return f"wing:{parts[1]}"
    return "method"


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the floors (see the module docstring), as `a -> b: why`."""
    bad = []
    for mod, targets in sorted(graph.items()):
        mine = layer(mod)
        for target in sorted(targets):
            theirs = layer(target)
            if mine == "front" or target == "ntt" or theirs in ("utils", mine):
                continue
            if mine == "utils":
                bad.append(f"{mod} -> {target}: utils/ imports only utils/")
            elif mine == "method" and theirs != "method":
                bad.append(f"{mod} -> {target}: the method imports no wing")
            elif mine.startswith("wing:") and theirs == "front":
                bad.append(f"{mod} -> {target}: a wing does not import the front door")
            elif mine.startswith("wing:") and theirs.startswith("wing:") and target.count(".") > 1:
                bad.append(f"{mod} -> {target}: another wing's internals (import its package instead)")
    return bad


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_the_floors_hold():
    graph = import_graph(REPO / "ntt")
    assert len(graph) > 50 and "ntt.runner.lifecycle" in graph and "ntt.inference" in graph
    assert floor_violations(graph) == []


def test_no_import_circle():
    assert import_circles(import_graph(REPO / "ntt")) == []


def test_the_checks_catch_what_they_guard(tmp_path):
    """A made-up package with one break of each kind: every one is reported (the checks can fail)."""
    pkg = tmp_path / "ntt"
    files = {
        "__init__.py": "",
        "cli.py": "from ntt.runner import main\n",
        "inference.py": "def f():\n    from ntt.runner import lines\n",  # the method reaching a wing, lazily
        "utils/__init__.py": "",
        "utils/errors.py": "from ntt import inference\n",  # utils reaching up
        "runner/__init__.py": "",
        "runner/main.py": "from ntt.app.segment import x\nfrom ntt.app import y\n",  # internals; package is fine
        "runner/lines.py": "from . import main\n",
        "runner/plan.py": "import ntt.runner.lines\n",
        "app/__init__.py": "",
        "app/segment.py": "from ntt.app import visualize\n",
        "app/visualize.py": "from ntt.app.segment import z\n",  # a circle inside a wing
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["ntt.runner.lines"] == {"ntt.runner.main"}
    assert graph["ntt.runner.plan"] == {"ntt.runner.lines"}
    assert floor_violations(graph) == [
        "ntt.inference -> ntt.runner.lines: the method imports no wing",
        "ntt.runner.main -> ntt.app.segment: another wing's internals (import its package instead)",
        "ntt.utils.errors -> ntt.inference: utils/ imports only utils/",
    ]
    assert import_circles(graph) == [["ntt.app.segment", "ntt.app.visualize"]]
