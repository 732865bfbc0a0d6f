"""Import rules of the package, read from the source with ``ast`` (attnpatch itself is never imported).

methods = WHAT, kernels = HOW, patchers = WHERE (see the README's layout): methods and kernels know
no framework and not each other; the patching runtime knows no front end; no two subpackages import
each other in a circle. Function-level (lazy) imports count: they run too, just later."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "attnpatch"
FRONT_ENDS = {"cli", "tools", "api", "__main__"}
FRAMEWORKS = {"diffusers", "transformers"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names one ``from ... import ...`` loads (a name may be a submodule)."""
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        head = ".".join(base + ([node.module] if node.module else []))
    else:
        head = node.module or ""
    return [head] + [f"{head}.{a.name}" for a in node.names]


def imports() -> dict[str, set[str]]:
    """{module: every absolute module name it imports, anywhere in its body}."""
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        mod, found = _module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                found |= set(_resolve(mod, path.name == "__init__.py", node))
        graph[mod] = found
    return graph


def area(name: str) -> str | None:
    """The layer a module belongs to: 'methods', 'kernels', 'cli', ... or a framework's name."""
    parts = name.split(".")
    if parts[0] in FRAMEWORKS:
        return parts[0]
    if parts[0] != "attnpatch" or len(parts) < 2:
        return None
    return parts[1]


def _violations(layer: str, banned: set[str]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in imports().items() if area(m) == layer
                  for t in ts if area(t) in banned)


_ABOVE_CORE = {"core", "patchers", "diffusers", "transformers"} | FRONT_ENDS
RULES = {
    "methods": {"kernels"} | _ABOVE_CORE,
    "kernels": {"methods"} | _ABOVE_CORE,
    "patchers": set(FRONT_ENDS),
    "core": {"patchers", "diffusers", "transformers"} | FRONT_ENDS,
    # the vocabulary and the shared numeric ops sit under methods and kernels
    **{low: {"methods", "kernels"} | _ABOVE_CORE for low in ("ops", "plan", "site", "blocks", "checks")},
}


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_downward(layer):
    assert not _violations(layer, RULES[layer])


def _area_graph() -> dict[str, set[str]]:
    """{area: areas it imports}; areas are subpackages and top-level modules (api, core, plan, ...)."""
    graph = {}
    for m, ts in imports().items():
        a = area(m)
        if a is not None:
            graph.setdefault(a, set()).update(area(t) for t in ts if t.startswith("attnpatch.") and area(t) != a)
    for targets in list(graph.values()):
        for t in targets:
            graph.setdefault(t, set())
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a path, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_cycle_between_subpackages():
    assert _cycle(_area_graph()) is None


def test_checker_sees_violations():
    """The rules could fail: a planted import is found, and a planted circle is found."""
    node = ast.parse("from ..kernels import tiles").body[0]
    assert "attnpatch.kernels.tiles" in _resolve("attnpatch.methods.x", False, node)
    assert area("attnpatch.kernels.tiles") == "kernels" and area("diffusers.models") == "diffusers"
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_attnpatch_loads_no_framework_plotting_or_front_end():
    """``import attnpatch`` stays light: frameworks, matplotlib and the front ends load on use.
    In a fresh interpreter, since this test process has imported all of them already."""
    import subprocess
    import sys

    heavy = ("diffusers", "transformers", "matplotlib", "attnpatch.cli", "attnpatch.tools")
    code = f"import sys, attnpatch; print([m for m in {heavy!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
