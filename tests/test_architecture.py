"""The import rules of docs/architecture.md, checked on the source: each part of the package imports
only parts on its own row or below, there is no import loop between parts, and no module imports
another module's private names."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "linear_transformers"

# bottom to top, as drawn in docs/architecture.md ("__init__" is the package's public face: it may
# import from anywhere below the programs, and everything may read its __version__)
ROWS = [
    {"integrity", "options", "data"},
    {"native"},
    {"ops", "feature_maps"},
    {"attention"},
    {"decode"},
    {"heads", "model", "blocks", "config"},
    {"checkpoint", "hf", "linearize", "results"},
    {"train", "export", "web"},
    {"commands", "bench", "experiments", "demo"},
    {"cli", "__main__"},
]
ROW = {part: i for i, row in enumerate(ROWS) for part in row}


def _module(path: Path) -> tuple[str, str]:
    """(dotted module name, its package) of a source file."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), ".".join(parts[:-1])
    return ".".join(parts), ".".join(parts[:-1])


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    """(importing module, imported module, imported names) for every runtime import inside the
    package (imports under `if TYPE_CHECKING:` are for annotations only and skipped)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module, package = _module(path)
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for stmt in node.body
            for child in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                found.extend((module, a.name, []) for a in node.names if a.name.split(".")[0] == "linear_transformers")
            elif isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    if node.module:
                        found.append((module, target, names))
                    else:
                        found.extend((module, f"{target}.{n}", []) for n in names)
                elif node.module and node.module.split(".")[0] == "linear_transformers":
                    found.append((module, node.module, names))
    return found


def test_every_part_has_a_row():
    parts = {_part(_module(p)[0]) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert parts <= set(ROW), f"parts missing from ROWS (and docs/architecture.md): {sorted(parts - set(ROW))}"


def test_imports_go_down_only():
    upward = []
    for src, dst, _ in _imports():
        a, b = _part(src), _part(dst)
        if a == b or b in ("__init__", "__version__") or a == "__init__":
            continue
        if ROW[b] > ROW[a]:
            upward.append(f"{src} imports {dst} ({a}: row {ROW[a]}, {b}: row {ROW[b]})")
    assert not upward, "imports that go up:\n" + "\n".join(upward)


def test_no_import_loop_between_parts():
    graph = collections.defaultdict(set)
    for src, dst, _ in _imports():
        a, b = _part(src), _part(dst)
        if a != b and "__init__" not in (a, b) and b != "__version__":
            graph[a].add(b)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [])


def test_no_private_names_imported_across_modules():
    private = [
        f"{src} imports {n} from {dst}"
        for src, dst, names in _imports()
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private, "\n".join(private)


def test_the_rules_fail_on_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: decode importing the model is caught."""
    monkeypatch.setitem(ROW, "decode", ROW["cli"])  # (as if decode sat above everything it is imported by)
    try:
        test_imports_go_down_only()
    except AssertionError as e:
        assert "imports linear_transformers.decode" in str(e)
    else:
        raise AssertionError("an upward import was not caught")
