"""Reading checkpoint files: official ``.npz``, ``torch.save`` files (``.pth``, ``.bin``,
``.pth.tar``; always ``weights_only=True``) and ``.safetensors``.

The container is recognised from the file's content (the zip member names of ``.npz``
and ``torch.save`` files, the JSON header of safetensors, the pickle opcode of legacy
``torch.save`` files), the extension serving only as a fallback. Every failure to read
raises ``ValueError`` naming the file, so that a truncated download or a foreign file
never surfaces as a low-level zip or pickle error.

Nothing read here can run code: ``torch.save`` files go through ``torch.load(...,
weights_only=True)`` (tensors and plain containers only; a file that needs any other Python
object is refused with ``UnsafeFileError`` before that object is built), ``.npz`` files through
``np.load(..., allow_pickle=False)`` (object arrays refused) and safetensors hold only tensors.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "CONTAINERS",
    "UnsafeFileError",
    "read_checkpoint",
    "safe_torch_load",
    "sniff_container",
    "unwrap_state_dict",
]

CONTAINERS: tuple[str, ...] = ("npz", "torch", "safetensors")

_EXTENSIONS = {
    ".npz": "npz",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".tar": "torch",
    ".ckpt": "torch",
    ".safetensors": "safetensors",
}

# Prefixes that wrappers add to every key: DistributedDataParallel / DataParallel
# (the authors' training checkpoints) and torch.compile's OptimizedModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _corrupt(path: str, what: str, err: BaseException | None = None) -> ValueError:
    cause = f": {type(err).__name__}: {err}" if err is not None else ""
    return ValueError(f"bitfast.checkpoint: {path} is {what}{cause}")


def sniff_container(path: str) -> str | None:
    """``"npz"``, ``"torch"`` or ``"safetensors"`` from the file's first bytes (and zip
    member names); None when the content matches none of them."""
    size = os.path.getsize(path)
    if size == 0:
        raise _corrupt(path, "empty (0 bytes); expected a checkpoint (.npz, .pth, .bin, .safetensors)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise _corrupt(path, "a truncated or corrupt zip archive (.npz or torch.save file)", err) from err
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise _corrupt(
            path,
            f"a zip archive that is neither a .npz nor a torch.save file (members: {names[:5]})",
        )
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8:
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol opcode: a legacy (non-zip) torch.save file
        return "torch"
    return None


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


class UnsafeFileError(ValueError):
    """A file that only a full unpickling could read: it holds Python objects other than
    tensors and plain containers, and building them can run arbitrary code. Nothing of the
    file was executed; ``str(err)`` names the file and what it asked for."""


def safe_torch_load(path: str | os.PathLike, *, map_location="cpu", mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers
    only. A file that asks for any other Python object raises ``UnsafeFileError`` (nothing of
    it is built or run); every other failure (truncated, corrupt, not a torch file, pickle
    opcodes the safe loader does not run) propagates as torch raised it, for the caller to
    word."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise
        raise UnsafeFileError(
            f"{os.fspath(path)} was refused: it asks for the Python object {found.group(1)}; a file that needs "
            "Python objects is never unpickled, because unpickling can run arbitrary code"
        ) from err


def _read_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise _corrupt(path, "not a readable .npz file (truncated or corrupt?)", err) from err
        raise UnsafeFileError(
            f"bitfast.checkpoint: {path} holds object arrays (pickled Python objects), which bitfast never loads: "
            "unpickling can run arbitrary code. Released BiT .npz files hold only numeric arrays; save the weights "
            "as numeric arrays (np.savez with float arrays) to load them"
        ) from err
    except Exception as err:  # zip CRC errors, short reads ...
        raise _corrupt(path, "not a readable .npz file (truncated or corrupt?)", err) from err


def _read_torch(path: str, zip_format: bool) -> object:
    try:
        return safe_torch_load(path, mmap=zip_format)
    except UnsafeFileError as err:
        raise UnsafeFileError(
            f"bitfast.checkpoint: {err}. Weights files are read with torch.load(weights_only=True) only. If it is a "
            "bitfast training checkpoint of an earlier version (format bitfast-train-v1) and you trust where it came "
            "from, read it where bitfast reads training checkpoints with --trust-checkpoint (Python: trusted=True), "
            f"or convert it once with `bitfast convert-checkpoint {path}`"
        ) from err
    except Exception as err:  # corrupt zip, truncated pickle
        raise _corrupt(path, "not a readable torch.save checkpoint (truncated, corrupt or not a state dict)", err) from err


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(
            f"bitfast.checkpoint: reading {path} needs the safetensors package; install it with "
            "`pip install safetensors` (or `pip install bitfast[safetensors]`)"
        ) from err
    try:
        return load_file(path, device="cpu")
    except Exception as err:
        raise _corrupt(path, "not a readable .safetensors file (truncated or corrupt?)", err) from err


def unwrap_state_dict(obj, path: str = "<checkpoint>") -> tuple[dict, bool]:
    """The tensors of a loaded checkpoint object and whether it was a training checkpoint.

    Accepts a plain state dict, a training checkpoint with a ``"model"`` or
    ``"state_dict"`` entry (the authors' ``{"step", "model", "optim"}``), and strips
    ``module.`` / ``_orig_mod.`` prefixes carried by every key.
    """
    if not isinstance(obj, Mapping):
        raise _corrupt(path, f"not a checkpoint: it holds a {type(obj).__name__}, expected a dict of tensors")
    training = False
    for wrapper in ("model", "state_dict"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj, training = inner, True
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (torch.Tensor, np.ndarray))}
    if not tensors:
        keys = [str(k) for k in list(obj)[:8]]
        raise _corrupt(path, f"not a checkpoint: it holds no tensors (keys: {keys})")
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                changed = True
    return tensors, training


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, str, bool]:
    """Read the tensors of a checkpoint file.

    Returns ``(tensors, container, training)``: a dict of name -> numpy array (``.npz``)
    or CPU tensor, the container (``"npz"``, ``"torch"``, ``"safetensors"``) and whether
    the tensors came out of a training checkpoint (``{"model": ...}``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is empty, truncated, corrupt or not a checkpoint.
        ImportError: a ``.safetensors`` file without the safetensors package.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"bitfast.checkpoint: no checkpoint file at {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"bitfast.checkpoint: {path} is a directory; expected a checkpoint file")
    container = sniff_container(path)
    zip_format = container == "torch" and _starts_with(path, b"PK")
    if container is None:
        name = path.lower()
        container = next((c for ext, c in _EXTENSIONS.items() if name.endswith(ext)), None)
        if container is None:
            raise _corrupt(
                path,
                "not a checkpoint: its content is not .npz, torch.save or safetensors and its extension is "
                f"not one of {sorted(_EXTENSIONS)}",
            )
    if container == "npz":
        obj = _read_npz(path)
    elif container == "safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _read_torch(path, zip_format)
    tensors, training = unwrap_state_dict(obj, path)
    return tensors, container, training
