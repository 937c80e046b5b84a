"""The package's floors: every import runs down a floor or stays on its own, and none closes a circle.

The installed package ``lumosrec`` maps the repository's folders to its parts
(``[tool.setuptools.package-dir]`` in ``pyproject.toml``); :data:`FLOORS` orders them. A module
may import its own floor and the floors below it, never one above, and the explicit imports of
all modules (at module level or inside functions) form no circle. ``python
tests/test_architecture.py`` prints the picture.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: floor by floor, bottom first: the foundation, models, views and LLM runtime, the Flower app,
#: the launchers, the experiment scripts (not installed)
FLOORS = (
    ("lumosrec.core",),
    ("lumosrec.models",),
    ("lumosrec.augment",),
    ("lumosrec.client", "lumosrec.server"),
    ("lumosrec.launch",),
    ("experiments",),
)
#: the folders' names as top-level imports: what the code must no longer use
OLD_NAMES = ("core", "models", "augment", "client", "server", "launch", "lumosrec.cli", "lumosrec.federated")


def package_folders() -> dict[str, Path]:
    """Import name -> folder of every installed package, plus the experiment scripts."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    assert set(folders) == set(setuptools["packages"]), "every installed package needs its folder"
    return {**folders, "experiments": ROOT / "experiments"}


def floor_of(module: str) -> int:
    """The floor of a module: that of the longest package name it starts with."""
    owners = [
        (len(package), level)
        for level, packages in enumerate(FLOORS)
        for package in packages
        if module == package or module.startswith(package + ".")
    ]
    if not owners:
        raise AssertionError(f"{module} is on no floor: add its package to FLOORS")
    return max(owners)[1]


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the packages (a subpackage's folder counted once)."""
    found: dict[str, Path] = {}
    for package, folder in sorted(package_folders().items()):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found.setdefault(".".join((package, *parts)), path)
    return found


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every import in the file that names a known module, or an old
    top-level name; ``from package import name`` counts as importing ``package.name`` when that is a module."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known or any(target == old or target.startswith(old + ".") for old in OLD_NAMES):
                found.append((target, node.lineno))
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """The module graph, and every import that runs up a floor or uses an old top-level name."""
    files = modules()
    known = set(files)
    graph: dict[str, set[str]] = {module: set() for module in files}
    wrong = []
    for module, path in files.items():
        for target, line in imports(module, path, known):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target not in known:
                wrong.append(f"{where} imports {target}: an old top-level name, use lumosrec.*")
                continue
            if floor_of(target) > floor_of(module):
                wrong.append(f"{where} imports {target}, a floor up ({floor_of(module)} -> {floor_of(target)})")
            graph[module].add(target)
    return graph, wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def picture() -> str:
    graph, wrong = import_graph()
    lines = []
    for level, packages in enumerate(FLOORS):
        count = sum(floor_of(module) == level for module in graph)
        lines.append(f"floor {level}: {', '.join(packages)} ({count} modules)")
    edges = sum(len(targets) for targets in graph.values())
    lines.append(
        f"{len(graph)} modules, {edges} imports between them: "
        f"{len(circles(graph))} circles, {len(wrong)} imports back up or by old names"
    )
    return "\n".join(lines)


def test_every_import_runs_down_a_floor() -> None:
    _, wrong = import_graph()
    assert not wrong, "\n".join(wrong)


def test_no_import_circle() -> None:
    graph, _ = import_graph()
    assert not circles(graph), circles(graph)


def test_every_module_is_on_a_floor() -> None:
    for module in modules():
        floor_of(module)


def test_the_check_sees_a_circle_and_an_import_up(tmp_path: Path) -> None:
    # the checks above can fail: a planted circle and a planted import up are found
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    planted = tmp_path / "training.py"
    planted.write_text("def f():\n    from lumosrec.launch.cli import main\n")
    found = imports("lumosrec.core.training", planted, {"lumosrec.launch.cli", "lumosrec.core.training"})
    assert found == [("lumosrec.launch.cli", 2)] and floor_of("lumosrec.launch.cli") > floor_of(
        "lumosrec.core.training"
    )
    planted.write_text("from models.sasrec import SASRec\n")
    assert imports("lumosrec.core.training", planted, set()) == [("models.sasrec", 1)]


if __name__ == "__main__":
    print(picture())
