"""The shape of the package, checked with the standard library's ``ast``
(docs/ARCHITECTURE.md):

* no import cycle among dials_diffuse modules (every import statement counts,
  also those inside functions);
* the library never imports the commands (``dials_diffuse.command_line``,
  installed from the top-level ``command_line/``);
* no module over ~500 lines, except the ones listed with their reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dials_diffuse"
MAX_LINES = 500
#: modules allowed over MAX_LINES, and why (also in docs/ARCHITECTURE.md)
LARGE_MODULES = {
    "dials_diffuse.simulate.simulator": "the image simulator: one forward model of a "
                                        "diffraction image (test data, not the pipeline)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set:
    """The dials_diffuse modules a module imports (explicit targets only: a
    submodule's implicit import of its parent packages is not an edge)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule pkg.sub
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES
                       or f"{base}.{a.name}".startswith("dials_diffuse.command_line")
                       else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] == "dials_diffuse")
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_the_library_does_not_import_the_commands():
    offenders = {name: sorted(t for t in targets if t.startswith("dials_diffuse.command_line"))
                 for name, targets in GRAPH.items()}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles():
    graph = {name: {t for t in targets if t in MODULES and t != name}
             for name, targets in GRAPH.items()}
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    n_lines = len(MODULES[name].read_text().splitlines())
    if name in LARGE_MODULES:
        return
    assert n_lines <= MAX_LINES, f"{name}: {n_lines} lines (limit {MAX_LINES})"


def test_large_modules_listed_are_large():
    """The exceptions stay honest: each is over the limit and exists."""
    for name in LARGE_MODULES:
        assert name in MODULES, name
        assert len(MODULES[name].read_text().splitlines()) > MAX_LINES, name
