"""The layers of bitfast import only downwards (docs/architecture.md): read from the sources'
import statements, function-level imports included, so that a low layer never depends on a
high one (which is how import cycles and "bitfast.ops needs bitfast.train" creep in)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "bitfast")
KERNELS = os.path.join(ROOT, "kernels")

# module (prefix) -> the bitfast modules (prefixes) it must not import
FORBIDDEN = {
    "bitfast.kernels": ["bitfast"],
    "bitfast._native": ["bitfast.backends", "bitfast.ops", "bitfast.nn", "bitfast.models", "bitfast.optim",
                        "bitfast.train", "bitfast.data", "bitfast.checkpoint", "bitfast.cli", "bitfast.kernels"],
    "bitfast._schemas": ["bitfast"],
    "bitfast._exports": ["bitfast"],
    "bitfast.backends": ["bitfast.ops", "bitfast.nn", "bitfast.models", "bitfast.optim", "bitfast.train",
                         "bitfast.data", "bitfast.checkpoint", "bitfast.cli"],
    "bitfast.ops": ["bitfast.nn", "bitfast.models", "bitfast.optim", "bitfast.train", "bitfast.data",
                    "bitfast.checkpoint", "bitfast.cli", "bitfast.bench"],
    "bitfast.nn": ["bitfast.train", "bitfast.cli", "bitfast.bench"],
    "bitfast.models": ["bitfast.train", "bitfast.cli", "bitfast.bench"],
    "bitfast.optim": ["bitfast.train", "bitfast.cli", "bitfast.bench", "bitfast.models", "bitfast.nn"],
    "bitfast.checkpoint": ["bitfast.train", "bitfast.cli", "bitfast.bench"],
    "bitfast.data": ["bitfast.train", "bitfast.cli", "bitfast.bench", "bitfast.models", "bitfast.ops"],
}


def _modules():
    """(module name, path) of every Python file of the package and of kernels/ (installed
    as bitfast.kernels)."""
    for base, prefix in ((PACKAGE, "bitfast"), (KERNELS, "bitfast.kernels")):
        for folder, _, files in os.walk(base):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), base)[:-3].replace(os.sep, ".")
                    rel = rel[: -len(".__init__")] if rel.endswith("__init__") else rel
                    yield (prefix + ("." + rel if rel and rel != "__init__" else "")), os.path.join(folder, name)


def _imports(module: str, path: str) -> set[str]:
    """Every module ``path`` imports, at any depth (relative imports resolved)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_modules_are_found():
    names = {m for m, _ in _modules()}
    assert {"bitfast", "bitfast.ops", "bitfast.ops.group_norm_relu", "bitfast.kernels.group_norm_relu",
            "bitfast.backends", "bitfast.train.loop"} <= names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_a_higher_one(layer):
    bad = []
    for module, path in _modules():
        if not _under(module, layer):
            continue
        for name in sorted(_imports(module, path)):
            for forbidden in FORBIDDEN[layer]:
                # bitfast.kernels may not import bitfast, but is itself under it.
                if _under(name, forbidden) and not _under(name, layer):
                    bad.append(f"{os.path.relpath(path, ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_function_level_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from bitfast.train import loop\n    import bitfast.cli\n")
    assert {"bitfast.train", "bitfast.train.loop", "bitfast.cli"} <= _imports("bitfast.ops.mod", str(path))
    rel = tmp_path / "rel.py"
    rel.write_text("from ..train import loop\nfrom . import _checks\n")
    assert {"bitfast.train.loop", "bitfast.ops._checks"} <= _imports("bitfast.ops.rel", str(rel))
