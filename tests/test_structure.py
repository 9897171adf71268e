"""The package's shape, as issue #25 set it: small classes and modules, no import cycle, a short top level, and
the Trainer's internals reached from one module only. Each check reads the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nerve_hf"
MAX_CLASS_LINES = 300
MAX_MODULE_LINES = 400
MAX_TOP_LEVEL_MODULES = 12
# What only nerve_hf/integrations/trainer_internals.py may touch: the Trainer's callback list, the TensorBoard
# integration's writer, the W&B module and accelerate's GradientState, and the call stack.
INTERNALS = (
    "CallbackHandler",
    "_init_summary_writer",
    "tb_writer",
    'sys.modules["wandb"]',
    "_getframe",
    "GradientState",
)
INTERNALS_MODULE = "integrations/trainer_internals.py"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of nerve_hf."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The nerve_hf modules ``name`` imports anywhere in its file (module level or inside functions): for
    ``from X import y``, ``X.y`` when that is a module, else ``X``."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                if child in known:
                    edges.add(child)
                elif source in known:
                    edges.add(source)
    edges.discard(name)
    return edges


def test_no_class_or_module_is_too_long():
    long_classes, long_modules = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long_classes.append((f"{name}.{node.name}", node.end_lineno - node.lineno + 1))
    assert long_classes == [], f"classes over {MAX_CLASS_LINES} lines"
    assert long_modules == [], f"modules over {MAX_MODULE_LINES} lines"


def test_no_import_cycle_inside_the_package():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The check above can fail: two modules importing each other form a cycle in imports_of's graph."""
    (tmp_path / "a.py").write_text("from nerve_hf import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from nerve_hf.a import x\n")
    known = {"nerve_hf.a": tmp_path / "a.py", "nerve_hf.b": tmp_path / "b.py"}
    assert imports_of("nerve_hf.a", known["nerve_hf.a"], known) == {"nerve_hf.b"}
    assert imports_of("nerve_hf.b", known["nerve_hf.b"], known) == {"nerve_hf.a"}


def test_the_top_level_stays_short():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("needle", INTERNALS)
def test_trainer_internals_are_reached_from_one_module(needle):
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if needle in path.read_text())
    assert set(users) <= {INTERNALS_MODULE}, users
