"""Loading the native builds: a build made for other op schemas is refused, not loaded.

Its static registrations would abort the whole process (torch checks each kernel's inferred
schema against the one defined in Python), so ``bitfast._native`` compares the schema
fingerprint compiled into the library with the sources' before importing it."""

import importlib.util
import os

import pytest

from bitfast import _native


def test_schema_tag_is_the_fingerprint_of_the_schema_file():
    tag = _native.schema_tag()
    assert len(tag) == 16 and int(tag, 16) >= 0
    assert _native.schema_tag() == tag


def test_the_fingerprint_covers_every_schema_string(tmp_path):
    from bitfast import _schemas

    ops = _schemas.ops_dir()
    base = _schemas.fingerprint(_schemas.collect(ops))
    assert base == _native.schema_tag()
    # Change any one schema (in a copy of the op modules): the fingerprint changes.
    for name in sorted(os.listdir(ops)):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(ops, name)).read()
        if "SCHEMAS = {" not in text:
            continue
        copy = tmp_path / name.replace(".py", "")
        copy.mkdir()
        (copy / name).write_text(text.replace("float eps", "float epsilon", 1).replace("Tensor[] grads", "Tensor[] g", 1))
        for other in os.listdir(ops):
            if other.endswith(".py") and other != name:
                (copy / other).write_text(open(os.path.join(ops, other)).read())
        assert _schemas.fingerprint(_schemas.collect(str(copy))) != base, name


def test_built_schema_tag_reads_the_string_compiled_into_a_library(tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF\0junk\0bitfast-schema-tag:0123456789abcdef\0more")
    assert _native.built_schema_tag(str(lib)) == "0123456789abcdef"
    lib.write_bytes(b"\x7fELF\0no tag here\0")
    assert _native.built_schema_tag(str(lib)) is None


def test_a_missing_extension_is_not_called_stale():
    assert _native.stale_reason("bitfast._no_such_extension") is None


def _require_c():
    if importlib.util.find_spec("bitfast._C") is None:
        pytest.skip("bitfast._C is not built here")


def test_the_installed_cpu_build_matches_the_sources():
    _require_c()
    assert _native.stale_reason("bitfast._C") is None, "the installed bitfast._C is stale: rebuild it"
    assert _native.loaded("bitfast._C"), _native.load_error("bitfast._C")


def test_a_build_for_other_schemas_is_refused_with_the_rebuild_command():
    _require_c()
    reason = _native.stale_reason("bitfast._C", expected="f" * 16)
    assert reason is not None
    assert "other op schemas" in reason and "pip install --no-build-isolation -e ." in reason
    assert os.path.basename(importlib.util.find_spec("bitfast._C").origin) in reason
