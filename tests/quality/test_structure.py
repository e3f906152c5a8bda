"""The package's shape: the tiers of pyproject.toml's import-linter contract, no import circle, no
module reaching into another's private names, and a core that needs only torch and safetensors.
Imports inside functions count: a lazy import is still a dependency."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import tiedlora

SOURCE = Path(tiedlora.__file__).parent
ROOT = Path(__file__).resolve().parents[2]
# The tiers are declared once, as import-linter's contract in pyproject.toml; the core is its lowest layer.
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
TIERS = [[f"tiedlora.{m.strip()}" for m in re.split(r"[:|]", layer)] for layer in CONTRACTS[0]["layers"]]
CORE = set(TIERS[-1])


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SOURCE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            names = [a.name for a in node.names]
            # `from . import x` imports the submodule x where there is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(s, []) for s in subs] or [(target, names)]
    return found


def internal(name: str) -> set[str]:
    return {m for m, _ in imports(name) if m in MODULES}


def test_every_module_is_seen():
    assert {"tiedlora.model", "tiedlora.multi", "tiedlora.tasks.base", "tiedlora.runs"} <= set(MODULES)


def test_no_import_circle():
    graph = {name: internal(name) - {name} for name in MODULES}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail(f"import circle: {' -> '.join([*path, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_imports_another_modules_private_names():
    bad = [
        (name, target, n)
        for name in MODULES
        for target, names in imports(name)
        if target in MODULES and target != name
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad


def test_the_core_needs_only_torch_and_safetensors():
    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "__future__"}
    for name in CORE:
        for target, _ in imports(name):
            assert target in CORE or target.split(".")[0] in allowed, f"{name} imports {target}"


def test_the_tiers_import_only_downward():
    """import-linter's contracts (pyproject.toml): each tier imports only from those below it, and
    serving loads no training, task or evaluation code, directly or not."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "2 kept, 0 broken" in out.stdout


def test_every_module_is_in_a_tier():
    tiers = {m for layer in TIERS for m in layer}
    assert {".".join(m.split(".")[:2]) for m in MODULES} - {"tiedlora"} <= tiers


def with_packages(name: str) -> set[str]:
    """`name` and the packages above it, whose __init__ runs first when it is imported."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)


def reachable(name: str) -> set[str]:
    """Every module importing `name` runs: its packages and what they all import, directly or not."""
    seen, todo = set(), [name]
    while todo:
        for target in set().union(*(with_packages(m) for m in internal(todo.pop()) | {name})) - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_only_serving_the_service_and_the_cli_import_from_serving():
    """The fine-tuning service extends the server; nothing else reaches into it."""
    outside = [m for m in MODULES if not m.startswith(("tiedlora.serve", "tiedlora.service")) and m != "tiedlora.cli"]
    assert not {
        m: sorted(t for t in internal(m) if t.startswith("tiedlora.serve"))
        for m in outside
        if any(t.startswith("tiedlora.serve") for t in internal(m))
    }


@pytest.mark.parametrize("name", ["tiedlora.train", "tiedlora.loss", "tiedlora.tokens", "tiedlora.generation"])
def test_training_and_evaluations_generation_import_nothing_from_serving(name):
    assert not [m for m in reachable(name) if m.startswith("tiedlora.serve")], name


def test_importing_training_loads_no_serving_module():
    """The same, as Python sees it: what `import tiedlora.train` leaves in sys.modules."""
    import subprocess

    code = "import sys, tiedlora.train; print(sorted(m for m in sys.modules if m.startswith('tiedlora.serve')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout
