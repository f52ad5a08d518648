"""The package's shape: stages as sub-packages, no import cycles (lazy imports included), small units."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deeplab_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports anywhere in its source, inside functions too."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from package import module` names a module; `from module import thing` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


def test_the_stages_are_packages():
    for package in ("model", "io", "crf", "run"):
        assert (PACKAGE / package / "__init__.py").is_file(), package
    assert {"crf.reference", "crf.plain", "crf.simd", "crf.lattice", "crf.meanfield", "crf.graph",
            "crf.tune", "crf.params", "run.segment"} <= {name.removeprefix("deeplab_cli.") for name in MODULES}


def test_no_import_cycles_lazy_imports_included():
    graph = {name: imported(name, path) for name, path in MODULES.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph[name]):
            visit(target)
        stack.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_the_checker_finds_a_cycle(tmp_path):
    # The same walk on a made-up pair that imports each other inside functions.
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from deeplab_cli.crf import meanfield\n")
    b.write_text("import deeplab_cli.errors\n")
    assert imported("deeplab_cli.errors", a) == {"deeplab_cli.crf.meanfield"}
    assert imported("x", b) == {"deeplab_cli.errors"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_small(name):
    source = MODULES[name].read_text()
    # The CLI only parses, calls and reports: one short module per command family.
    limit = 200 if name == "deeplab_cli.cli" or name.startswith("deeplab_cli.cli.") else 800
    assert len(source.splitlines()) <= limit
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long
