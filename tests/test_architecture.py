"""The layer rule of ``dcd_jax/`` (docs/architecture.md), read from the source: every module's
imports (function-level ones included) are parsed with ``ast``; the test fails on an import cycle
or on an import that goes up the layer table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dcd_jax"

# Top-level modules with no dcd_jax dependency above them: the ground every part may stand on.
GROUND = {"errors", "paths", "storage", "atomic_files", "config", "sharding", "distributed", "numerics", "host_memory",
          "stop_tokens"}
FACES = {"cli", "demo", "tiny_models", "__init__"}  # entry points (and the demo's tiny checkpoints): may use every part

# part -> parts it may import (besides itself and the ground). "Nothing below train imports train."
ALLOWED: dict[str, set[str]] = {
    "ground": set(),
    "models": set(),
    "convert": {"models"},
    "data": set(),
    "objectives": set(),
    "infer": {"models", "objectives"},
    "eval": {"models", "convert", "data", "objectives", "infer"},
    "teacher": {"models", "convert", "data", "objectives", "infer", "eval"},
    "train": {"models", "convert", "data", "objectives", "infer", "eval", "teacher"},
    "face": {"models", "convert", "data", "objectives", "infer", "eval", "teacher", "train"},
}

# Known exceptions, each with its reason (to be removed, not added to).
EXCEPTIONS = {
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for type checkers never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def module_imports(path: Path, modules: set[str], package_dir: Path = PACKAGE) -> set[str]:
    """The dcd_jax modules ``path`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dcd_jax")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dcd_jax":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): module_imports(p, modules) for p in paths}


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "face"  # dcd_jax/__init__.py
    if parts[1] in GROUND:
        return "ground"
    if parts[1] in FACES:
        return "face"
    return parts[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        part = part_of(module)
        for dep in sorted(deps):
            dep_part = part_of(dep)
            if dep_part in (part, "ground") or dep_part in ALLOWED[part] or (module, dep) in EXCEPTIONS:
                continue
            bad.append(f"{module} ({part}) imports {dep} ({dep_part})")
    return bad


def test_every_part_is_in_the_table():
    parts = {part_of(m) for m in import_graph()}
    assert parts <= set(ALLOWED), f"parts missing from the layer table: {sorted(parts - set(ALLOWED))}"


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_imports_follow_the_layer_table():
    assert layer_violations(import_graph()) == []


def test_exceptions_are_still_needed():
    graph = import_graph()
    stale = [pair for pair in EXCEPTIONS if pair[1] not in graph.get(pair[0], set())]
    assert stale == [], f"remove these from EXCEPTIONS: {stale}"


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checkers themselves, on a graph with one upward import (data -> train) and one cycle."""
    graph = import_graph()
    graph["dcd_jax.data.records"] = graph["dcd_jax.data.records"] | {"dcd_jax.train.loop"}
    assert layer_violations(graph) == ["dcd_jax.data.records (data) imports dcd_jax.train.loop (train)"]
    graph["dcd_jax.sharding"] = graph["dcd_jax.sharding"] | {"dcd_jax.data.records"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


@pytest.mark.parametrize("source, expected", [
    ("from dcd_jax.train import loop", {"dcd_jax.train.loop"}),
    ("from dcd_jax.train.loop import train", {"dcd_jax.train.loop"}),
    ("def f():\n    import dcd_jax.models\n", {"dcd_jax.models"}),
    ("from ..models import bind", {"dcd_jax.models"}),
    ("from . import runner", {"dcd_jax.eval.runner"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dcd_jax.train import loop\n", set()),
])
def test_imports_are_read_with_their_targets(tmp_path, source, expected):
    probe = tmp_path / "dcd_jax" / "eval" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    modules = {"dcd_jax.train.loop", "dcd_jax.models", "dcd_jax.eval.runner", "dcd_jax.eval.probe"}
    assert module_imports(probe, modules, tmp_path / "dcd_jax") == expected


def model_type_tests(source: str) -> list[str]:
    """Comparisons that test a ``model_type`` (``cfg.model_type == ...``, ``hf["model_type"] in ...``,
    ``hf.get("model_type") != ...``), as source lines."""
    def names_model_type(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Attribute) and n.attr == "model_type" or isinstance(n, ast.Name) and n.id == "model_type"
                   or isinstance(n, ast.Constant) and n.value == "model_type" for n in ast.walk(node))

    return [ast.unparse(n) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Compare)
            and any(names_model_type(x) for x in (n.left, *n.comparators))]


def test_only_family_modules_test_a_model_type():
    """A family is one module (docs/architecture.md, "How to add a model family"): the rest of
    models/ and convert/ reads the config's switches, never the family name; the registry's lookup
    (``family_of``) is the one place that compares it."""
    found = {}
    for path in sorted([*(PACKAGE / "models").rglob("*.py"), *(PACKAGE / "convert").rglob("*.py")]):
        if "families" in path.parts or path.name == "registry.py":
            continue
        if tests := model_type_tests(path.read_text()):
            found[str(path.relative_to(PACKAGE))] = tests
    assert found == {}


def test_the_model_type_check_catches_a_family_test():
    assert model_type_tests("if cfg.model_type == 'gemma3_text':\n    pass") == ["cfg.model_type == 'gemma3_text'"]
    assert model_type_tests("x = hf.get('model_type') in ('qwen2', 'qwen3')") == ["hf.get('model_type') in ('qwen2', 'qwen3')"]
    assert model_type_tests("x = cfg.qk_norm == True") == []
