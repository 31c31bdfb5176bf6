"""The layer rule of docs/design.md, read from the code: every emakit import points down, and no cycles.

All runtime imports count, including those inside functions; only imports under ``if TYPE_CHECKING:`` are
left out (they never run). Importing ``emakit.a.b`` also runs ``emakit/a/__init__.py``, so a package's
``__init__`` is held to the same rule as its modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "emakit"

#: Bottom to top. A module may import modules of lower layers, and of its own layer only inside its own
#: package, except at the top, where applications may use each other (the cycle check keeps all acyclic). The most specific prefix decides a module's layer.
LAYERS: list[tuple[str, list[str]]] = [
    # emakit.posthoc's __init__ imports its modules lazily (no runtime import), so the package sits at the bottom
    (
        "foundation",
        [
            "emakit._version",
            "emakit._lazy",
            "emakit.atomic",
            "emakit.safetensors_file",
            "emakit._compat",
            "emakit._cli_args",
            "emakit.time",
            "emakit.rng",
            "emakit.posthoc",
            "emakit.posthoc.profiles",
            "emakit.posthoc.targets",
        ],
    ),
    # how an update runs, and torch.distributed below the trainer
    ("engine", ["emakit.engine", "emakit.parallel"]),
    (
        "functional API and post-hoc files",
        ["emakit.functional", "emakit.posthoc.snapshots", "emakit.posthoc.reconstruction", "emakit.posthoc.sweep"],
    ),
    ("averaging", ["emakit.averaging"]),
    ("loop vocabulary", ["emakit.core"]),
    ("algorithms", ["emakit.algorithms"]),
    ("checkpoints", ["emakit.checkpoint"]),
    ("callbacks", ["emakit.callbacks"]),
    ("trainer", ["emakit.trainer"]),
    (
        "applications and facades",
        [
            "emakit.distributed",
            "emakit.integrations",
            "emakit.demo",
            "emakit.bench",
            "emakit.posthoc.cli",
            "emakit.cli",
            "emakit.__main__",
            "emakit",
        ],
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} has no layer: add it to LAYERS and to docs/design.md")
    return best


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported emakit module, line) for every import that can run, package parents included."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import mod` imports the submodule pkg.mod
                candidate = f"{base}.{alias.name}"
                found.append((candidate if _module_path(candidate) else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    result = []
    for name, line in found:
        if name != "emakit" and not name.startswith("emakit."):
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the parents run first
            parent = ".".join(parts[:i])
            # a module's own ancestor packages are already being imported when it runs: not an edge
            if parent != "emakit" and _module_path(parent) and not (module + ".").startswith(parent + "."):
                result.append((parent, line))
    return result


def _module_path(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def package_of(module: str) -> str:
    path = _module_path(module)
    assert path is not None
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def import_graph() -> dict[str, list[tuple[str, int]]]:
    return {
        module_name(path): runtime_imports(path, module_name(path))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    problems = []
    for module, imports in graph.items():
        own = layer_of(module)
        for target, line in imports:
            theirs = layer_of(target)
            same_package = package_of(target).startswith(package_of(module)) or package_of(module).startswith(
                package_of(target) + "."
            )
            top = own == len(LAYERS) - 1  # applications may use each other (the cycle check still applies)
            if theirs > own or (theirs == own and not same_package and not top):
                problems.append(
                    f"{module} (layer {LAYERS[own][0]!r}) imports {target} (layer {LAYERS[theirs][0]!r}) "
                    f"at line {line}: imports must point down"
                )
    return problems


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    edges = {m: sorted({t for t, _ in imports if t in graph}) for m, imports in graph.items()}
    found, state = [], dict.fromkeys(edges, 0)
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state[nxt] == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif state[nxt] == 0:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in edges:
        if state[node] == 0:
            dfs(node)
    return found


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_imports_point_down() -> None:
    problems = violations(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_the_rule_catches_a_planted_upward_import(tmp_path: Path) -> None:
    """The checker itself: an import of the Trainer, or of the functional API, inside an engine function is caught."""
    graph = import_graph()
    planted = tmp_path / "plan.py"
    planted.write_text(
        "def f():\n    from emakit.trainer import Trainer\n    from emakit.functional import compute_ema\n"
        "    return Trainer, compute_ema\n"
    )
    graph["emakit.engine.plan"] = [*graph["emakit.engine.plan"], *runtime_imports(planted, "emakit.engine.plan")]
    problems = violations(graph)
    assert any("emakit.engine.plan" in p and "emakit.trainer" in p and "line 2" in p for p in problems), problems
    assert any("emakit.engine.plan" in p and "emakit.functional" in p and "line 3" in p for p in problems), problems


def test_type_checking_imports_are_ignored(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from emakit.trainer import Trainer\n")
    assert runtime_imports(source, "emakit.functional") == []


def test_import_emakit_imports_no_framework() -> None:
    frameworks = ("lightning", "pytorch_lightning", "transformers", "accelerate")
    code = (
        "import sys, emakit; from emakit import EMA, Trainer, compute_ema, export_ema_weights; "
        f"print(' '.join(m for m in {frameworks!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == ""
