"""What the project declares is what its code and tests import: an install from pyproject.toml alone
(the README's quick start, without the lock file) has every package they need."""

import ast
import importlib.metadata
import re
import sys
import tomllib

from conftest import REPO

SOURCES = ("mnist_flax", "pytorch_original", "scripts", "tests")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {normalized(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def imported_top_level_modules() -> dict[str, str]:
    """{module: a file that imports it} for every module outside the standard library and this repository."""
    local = {p.stem for folder in SOURCES for p in (REPO / folder).glob("*.py")} | set(SOURCES)
    found = {}
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    installed = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    # A module that is not installed here (torch, in the quick start) must be a distribution's own name.
    undeclared = {module: where for module, where in imported_top_level_modules().items()
                  if not {normalized(d) for d in installed.get(module, [module])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_scan_sees_the_imports_it_must():
    modules = imported_top_level_modules()
    assert {"jax", "flax", "optax", "tensorflow_datasets", "PIL", "pytest", "chex", "torch"} <= set(modules)
    assert "mnist_flax" not in modules and "conftest" not in modules and "json" not in modules


def test_only_the_commands_import_cli():
    """cli.py parses and turns errors into lines; what the commands are built from never needs it."""
    commands = {target.split(":")[0].split(".")[1] for target in
                tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"].values()}
    importers = set()
    for path in (REPO / "mnist_flax").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module == "mnist_flax.cli" or (
                    node.module == "mnist_flax" and "cli" in [alias.name for alias in node.names])):
                importers.add(path.stem)
    assert importers == commands
