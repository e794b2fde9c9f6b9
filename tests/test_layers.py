"""The import graph of `stale` against docs/architecture.md: no import cycle between modules, and no package
imports one its row does not allow. Imports inside functions count (a deferred import only hides a cycle)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stale"


def allowed_imports() -> dict[str, set[str]]:
    """package -> the packages it may import, from the table in docs/architecture.md."""
    rows = {}
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[a-z]+", cells[0]) and cells[0] != "package":
            rows[cells[0]] = {c.strip() for c in cells[2].split(",") if c.strip()}
    return rows


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> str:
    """stale.data.loader -> data; stale.train and stale.training.* -> train; the root `stale` (its version only,
    importing nothing) is below every package."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "stale"
    return "train" if name in ("train", "training") else name


def import_graph() -> dict[str, set[str]]:
    """module -> the stale modules it imports (a `from pkg import name` names the submodule when there is one)."""
    known = modules()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path}:{node.lineno}: a relative import; stale imports absolutely"
                # `from stale.models import rope` depends on the module stale.models.rope, `from stale.models
                # import build_model` on the package stale.models
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {t for n in names if n.startswith("stale") and (t := resolve(n)) and t != module}
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_table_names_every_package():
    rows = allowed_imports()
    packages = {layer(m) for m in modules()} - {"stale"}
    assert packages <= set(rows), f"packages missing from docs/architecture.md: {sorted(packages - set(rows))}"
    for name, allowed in rows.items():
        assert allowed <= set(rows), f"{name} may import unknown packages {sorted(allowed - set(rows))}"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_every_import_is_allowed_by_the_layering():
    rows = allowed_imports()
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in import_graph().items()
        for t in targets
        if layer(t) not in (layer(m), "stale") and layer(t) not in rows.get(layer(m), set())
    )
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_the_checker_sees_a_deferred_import_and_a_cycle(tmp_path):
    """The negative control: a cycle hidden in a function, and a model importing the system, are both found."""
    graph = {"stale.models.a": {"stale.system.b"}, "stale.system.b": {"stale.models.a"}}
    assert cycles(graph) == [["stale.models.a", "stale.system.b"]]
    assert "system" not in allowed_imports()["models"]
    source = "def f():\n    from stale.system.stale_system import StaleSystem\n"
    found = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert found and found[0].module == "stale.system.stale_system"
