"""The package layering: no import cycles between esolm_dist's modules, and the lower layers (the
model, the algorithm, kernels, data, inference, the weights' layout) import nothing of the trainer,
its callbacks or the export tool. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import esolm_dist

PACKAGE_ROOT = Path(esolm_dist.__file__).parent
LOWER = ("esolm_dist.model", "esolm_dist.eso", "esolm_dist.kernels", "esolm_dist.data", "esolm_dist.inference",
         "esolm_dist.weight_layout")
UPPER = ("esolm_dist.train", "esolm_dist.callbacks", "esolm_dist.convert", "esolm_dist.convert_cli",
         "esolm_dist.reference.convert")


def module_files() -> dict[str, Path]:
    import esolm_dist.kernels

    files = {}
    roots = {"esolm_dist": PACKAGE_ROOT, "esolm_dist.kernels": Path(esolm_dist.kernels.__file__).parent}
    for package, root in roots.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The esolm_dist modules ``path`` imports (``from P import x`` counts P.x when that is a module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring a package's imports
    of its own submodules (``__init__`` re-exports), which cannot loop at import time."""
    edges = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in graph.items()}
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "p": {"p.x"}, "p.x": {"p"}}
    assert cycles(graph) == [["a", "b", "c"]]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between esolm_dist's subpackages and top-level modules (esolm_dist.parallel, ...)."""
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(package(module), set()).update(package(t) for t in targets if package(t) != package(module))
    return packages


def test_no_import_cycles_between_modules_or_packages():
    graph = import_graph()
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == []


def test_lower_layers_do_not_import_the_trainer_or_the_tools():
    graph = import_graph()
    wrong = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.startswith(LOWER)
                   for b in targets if b.startswith(UPPER))
    assert wrong == []
