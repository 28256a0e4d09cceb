"""``bitfast.checkpoint.export`` (the .npz writer) is now ``bitfast.checkpoint.npz_writer``, so
that "export" means one thing (``bitfast.export``, the inference export): the old path still
imports, with a DeprecationWarning, and gives the same functions."""

import importlib
import sys

import pytest


def test_the_npz_writer_old_path_warns_and_resolves():
    from bitfast.checkpoint import npz_writer

    sys.modules.pop("bitfast.checkpoint.export", None)
    with pytest.warns(DeprecationWarning, match="moved to bitfast.checkpoint.npz_writer"):
        old = importlib.import_module("bitfast.checkpoint.export")
    assert old.save_npz is npz_writer.save_npz and old.timm_to_npz_key is npz_writer.timm_to_npz_key
