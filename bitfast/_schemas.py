"""The fingerprint of bitfast's op schemas, computed from the sources without importing them.

Every op declares its schemas once, in its own module under ``bitfast/ops/``, as a
module-level literal ``SCHEMAS = {"<op>": "(<args>) -> <returns>", ...}`` that it passes to
``bitfast.ops._register.define_op``. The native builds are compiled for those schemas: setup.py
(which must not import bitfast or torch to compute it) writes the fingerprint of all of them
into the extensions, and ``bitfast._native`` refuses a build whose fingerprint differs, with
the command that rebuilds it. Both read the schemas with this module: standard library only,
loadable by path.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os

__all__ = ["collect", "fingerprint", "ops_dir"]


def ops_dir() -> str:
    """The folder of the op modules (``bitfast/ops``) next to this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops")


def collect(folder: str | None = None) -> dict[str, str]:
    """Every ``SCHEMAS`` literal of the modules in ``folder`` (default: ``bitfast/ops``), merged:
    op name -> schema. A name declared twice is an error."""
    folder = folder or ops_dir()
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "SCHEMAS" for t in targets) and node.value is not None:
                    for op, schema in ast.literal_eval(node.value).items():
                        if op in found:
                            raise ValueError(f"op {op!r} is declared twice (again in {path})")
                        found[op] = schema
    return found


def fingerprint(schemas: dict[str, str] | None = None) -> str:
    """The first 16 hex digits of the SHA-256 of the schemas (sorted by name)."""
    schemas = collect() if schemas is None else schemas
    text = json.dumps(sorted(schemas.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
