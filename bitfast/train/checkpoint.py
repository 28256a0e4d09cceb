"""Training checkpoints: atomic writes, RNG state capture, start-of-run checks.

A training checkpoint is one ``torch.save`` file holding everything a run needs to continue
bit for bit: the model and optimizer state dicts, the EMA weights (when the optimizer keeps
them), the GradScaler state, the step, the random-number-generator states (Python, NumPy,
torch CPU, every CUDA device, and the run's own generators) and the run's configuration.

Checkpoints are shared (a teacher for distillation, a fine-tuned model to evaluate or export),
so reading one must never run code. Since format ``bitfast-train-v2`` a checkpoint holds only
plain data: dicts, lists, tuples, strings, numbers, booleans, None and tensors (the config as a
dict, every RNG state as tensors and numbers); ``save_checkpoint`` refuses anything else, and
``load_checkpoint`` reads with ``torch.load(..., weights_only=True)``, which builds no other
Python object. Files of format ``bitfast-train-v1`` (earlier versions) hold a pickled NumPy
array and are read only with ``trusted=True`` (``--trust-checkpoint``); ``convert_checkpoint``
(``bitfast convert-checkpoint``) rewrites one in the new format once.

Files are written atomically: to a temporary file in the same directory, flushed and
fsynced, then renamed over the target with ``os.replace``, so a crash or a full disk leaves
either the previous checkpoint or the new one, never a torn file. ``probe_output_dir`` checks
at the start of a run that the output directory is writable and has room, so a run fails
before its first step rather than at its first checkpoint an hour later.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from bitfast.checkpoint.io import UnsafeFileError, safe_torch_load, sniff_container

__all__ = [
    "CheckpointError",
    "FORMAT",
    "LEGACY_FORMATS",
    "UntrustedCheckpointError",
    "check_compatible",
    "check_plain_data",
    "convert_checkpoint",
    "get_rng_state",
    "load_checkpoint",
    "probe_output_dir",
    "save_checkpoint",
    "set_rng_state",
    "state_dict_bytes",
]

# Stored in every checkpoint; bumped if the layout changes incompatibly.
FORMAT = "bitfast-train-v2"
# Earlier formats that load_checkpoint(trusted=True) reads and converts.
LEGACY_FORMATS = ("bitfast-train-v1",)

# The leaves a checkpoint may hold: what torch.load(weights_only=True) rebuilds without
# any other Python object.
_PLAIN_LEAVES = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for what was asked (another model, class count,
    format), or an output directory that cannot hold checkpoints."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that only a full unpickling could read (Python objects inside: an earlier
    bitfast format, or a crafted file). Nothing of it was run; the message names the file and
    the opt-in (``--trust-checkpoint`` / ``trusted=True``) and how to convert it once."""


def _trust_hint(path: str) -> str:
    return (
        f"If {path} is a checkpoint written by an earlier bitfast version (format {LEGACY_FORMATS[-1]}) and you trust "
        "where it came from, pass --trust-checkpoint (Python: trusted=True) to read it this once, or convert it once "
        f"with `bitfast convert-checkpoint {path}` (Python: bitfast.train.checkpoint.convert_checkpoint); never do "
        "either for a file you did not make or cannot vouch for"
    )


def check_plain_data(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the first value under ``obj`` that a checkpoint cannot hold:
    anything but dicts (``OrderedDict`` too) with str/int keys, lists, tuples, str, int, float,
    bool, None, tensors, dtypes, devices and sizes. ``where`` names ``obj`` in the message."""
    if isinstance(obj, _PLAIN_LEAVES):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"save_checkpoint: {where} has a key of type {type(k).__name__} ({k!r}); keys must be "
                                "str or int")
            check_plain_data(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain_data(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"save_checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
        "dicts, lists, tuples, str, int, float, bool, None and tensors (so that reading it never runs code): "
        "convert it first (dataclasses.asdict, .tolist(), torch.as_tensor)"
    )


def _to_plain(obj: Any, where: str) -> Any:
    """A value of a trusted legacy checkpoint as plain data (NumPy arrays and scalars, tuples of
    plain values and dataclasses converted); anything else raises ``CheckpointError``."""
    import numpy as np

    if isinstance(obj, _PLAIN_LEAVES):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_plain(dataclasses.asdict(obj), where)
    if isinstance(obj, Mapping):
        return {k: _to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if type(obj) is tuple else items
    raise CheckpointError(f"cannot convert {where}: a {type(obj).__module__}.{type(obj).__qualname__} is not plain data")


def _numpy_state_to_plain(state: Any) -> Any:
    """NumPy's legacy ``get_state()`` tuple as plain data (the key array as an int64 tensor)."""
    if isinstance(state, Mapping) or state is None:
        return state
    name, keys, pos, has_gauss, cached = state
    import numpy as np

    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _upgrade(state: dict, path: str) -> dict:
    """A legacy (v1) checkpoint's content in the current format's layout."""
    state = dict(state)
    rng = state.get("rng")
    for one in rng if isinstance(rng, list) else [rng]:
        if isinstance(one, dict) and "numpy" in one:
            one["numpy"] = _numpy_state_to_plain(one["numpy"])
    state = _to_plain(state, "checkpoint")
    state["format"] = FORMAT
    try:
        check_plain_data(state, "checkpoint")
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be converted: {exc}") from exc
    return state


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + ``os.replace``).

    ``state`` gets a ``"format"`` entry. It must hold only plain data (dicts, lists, tuples,
    str, int, float, bool, None, tensors): anything else raises ``TypeError`` naming where it
    is, before anything is written, so that every checkpoint loads without running code.
    Returns the path written. On any error the temporary file is removed and the previous file
    at ``path`` (if any) is left untouched.
    """
    path = os.fspath(path)
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: state must be a mapping; got {type(state).__name__}")
    check_plain_data(dict(state), "state")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    trusted: bool = False, mmap: bool = False) -> dict:
    """Read a training checkpoint written by ``save_checkpoint``, without running any code.

    The file is read with ``torch.load(..., weights_only=True)``: only tensors and plain
    containers are rebuilt. A file that needs other Python objects (a checkpoint of the
    earlier format ``bitfast-train-v1``, or a crafted file) raises ``UntrustedCheckpointError``
    unless ``trusted=True``: then, and only then, it is unpickled in full, which runs whatever
    code the file carries, so pass it only for files you made or can vouch for. A legacy
    checkpoint comes back converted to the current layout (``convert_checkpoint`` writes it).

    ``mmap=True`` maps the tensors of a zip-format file (every file ``save_checkpoint``
    writes) instead of reading them: what reads only a checkpoint's small entries (its
    resolution, config, step) then costs no more than those (other files are read in full).

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a file that is
    not a bitfast training checkpoint (e.g. released weights: load those with
    ``bitfast.load_pretrained`` / ``--pretrained`` instead).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        container = sniff_container(path)
    except ValueError as exc:  # empty, or a corrupt zip
        raise CheckpointError(f"checkpoint {path!r} could not be read ({exc})") from exc
    if container in ("npz", "safetensors"):
        raise CheckpointError(
            f"{path!r} is a .{container} weights file, not a bitfast training checkpoint (format {FORMAT!r}); "
            "pretrained weights are loaded with --pretrained / bitfast.load_pretrained"
        )
    if container is None:
        raise CheckpointError(f"checkpoint {path!r} could not be read: its content is not a torch.save file")
    if mmap:
        with open(path, "rb") as f:
            mmap = f.read(2) == b"PK"  # torch maps zip-format files only
    try:
        state = safe_torch_load(path, map_location=map_location, mmap=mmap)
    except UnsafeFileError as exc:
        if not trusted:
            raise UntrustedCheckpointError(f"checkpoint {exc}. {_trust_hint(path)}") from None
        try:
            # the caller vouched for the file
            state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        except Exception as exc2:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise CheckpointError(f"checkpoint {path!r} could not be read ({type(exc2).__name__}: {exc2})") from exc2
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"checkpoint {path!r} could not be read ({type(exc).__name__}: {exc})") from exc
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt in LEGACY_FORMATS:
        return _upgrade(state, path)
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path!r} is not a bitfast training checkpoint (format {FORMAT!r}); pretrained weights "
            "(.npz, timm or authors' files) are loaded with --pretrained / bitfast.load_pretrained"
        )
    return state


def convert_checkpoint(path: str | os.PathLike, output: str | os.PathLike | None = None) -> str:
    """Rewrite a trusted training checkpoint of an earlier format (``bitfast-train-v1``) in the
    current one, which loads without running code; ``output`` defaults to ``path`` (replaced
    atomically). The old file is unpickled in full: convert only files you trust. A file that
    already is in the current format is copied unchanged in content. Returns the path written.
    """
    state = load_checkpoint(path, trusted=True)
    state.pop("format", None)
    return save_checkpoint(os.fspath(output if output is not None else path), state)


# What --resume compares, with the flags that set each (for the message).
_IDENTITY_FLAGS = {
    "norm": "--norm",
    "classes": "--classes / the data's class folders",
    "data": "--data",
    "batch_size": "--batch-size",
    "total_steps": "the schedule (--steps, --schedule, --epochs)",
    "seed": "--seed",
}


def _saved_identity(state: Mapping[str, Any]) -> dict:
    """What a checkpoint says about its run: its ``"run"`` entry, or what older checkpoints'
    config and metadata hold."""
    if isinstance(state.get("run"), Mapping):
        return dict(state["run"])
    config = state.get("config") or {}
    found = {"norm": config.get("norm"), "classes": state.get("classes"), "batch_size": config.get("batch_size"),
             "seed": config.get("seed")}
    return {k: v for k, v in found.items() if v is not None}


def check_compatible(state: Mapping[str, Any], *, model: str, num_classes: int, path: str = "checkpoint",
                     run: Mapping[str, Any] | None = None) -> None:
    """Raise ``CheckpointError`` unless ``state`` (a loaded checkpoint) was written by the run
    being resumed: the same ``model`` and ``num_classes`` and, where both sides know it, the
    same ``run`` identity (``norm``, class names, data source and size, batch size, total
    steps, seed; see ``train_loop``). The message names every difference and the flag behind it."""
    config = state.get("config") or {}
    saved_model = config.get("model")
    saved_classes = state.get("num_classes", config.get("num_classes"))
    diffs = []
    if saved_model is not None and saved_model != model:
        diffs.append(f"it was written for model {saved_model!r}, this run builds {model!r} (pass --model {saved_model})")
    if saved_classes is not None and int(saved_classes) != int(num_classes):
        diffs.append(f"it has a {saved_classes}-class head, this run's data has {num_classes} classes")
    saved = _saved_identity(state)
    for key, ours in (run or {}).items():
        theirs = saved.get(key)
        if theirs is None or ours is None:
            continue
        if key == "data":
            for part, label in (("source", "data"), ("train_size", "training images")):
                if part in theirs and part in ours and theirs[part] != ours[part]:
                    diffs.append(f"its {label}: {theirs[part]!r}, this run's: {ours[part]!r} (--data)")
        elif key == "classes" and list(theirs) != list(ours):
            diffs.append(f"its classes: {list(theirs)}, this run's: {list(ours)} ({_IDENTITY_FLAGS[key]})")
        elif key != "classes" and theirs != ours:
            diffs.append(f"its {key.replace('_', ' ')}: {theirs!r}, this run's: {ours!r} ({_IDENTITY_FLAGS[key]})")
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}, another run's checkpoint: " + "; ".join(diffs)
            + ". Resume with the run's own settings, or start a new run in another --output directory (or "
            "--overwrite); to start from its weights instead, pass it as --pretrained"
        )


def get_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The states of Python's ``random``, NumPy's global generator, torch's CPU and CUDA
    generators and of the named ``generators`` (e.g. the MixUp generator), for
    ``set_rng_state``; plain data only (tensors, numbers, tuples), as checkpoints require."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    try:
        import numpy

        state["numpy"] = _numpy_state_to_plain(numpy.random.get_state(legacy=True))
    except ImportError:  # numpy is a dependency, but the state is only a nicety
        pass
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore the states captured by ``get_rng_state`` (CUDA states only when the same
    number of devices is visible; named generators that the state lacks are left alone)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if state.get("numpy") is not None:
        import numpy

        saved = state["numpy"]
        if isinstance(saved, Mapping):  # the plain form get_rng_state writes
            saved = (saved["bit_generator"], saved["key"].numpy().astype(numpy.uint32), saved["pos"],
                     saved["has_gauss"], saved["cached_gaussian"])
        numpy.random.set_state(saved)
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])


def state_dict_bytes(*modules_or_dicts) -> int:
    """Bytes of the tensors in the given modules / state dicts (an estimate of a checkpoint)."""
    total = 0
    for obj in modules_or_dicts:
        tensors = obj.state_dict().values() if hasattr(obj, "state_dict") and not isinstance(obj, Mapping) else obj.values()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
            elif isinstance(t, Mapping):
                total += state_dict_bytes(t)
    return total


def probe_output_dir(directory: str | os.PathLike, need_bytes: int = 0) -> None:
    """Fail now, not at the first checkpoint: create ``directory``, write and fsync a probe
    file of up to 1 MiB there and remove it, and check that the disk has ``need_bytes`` free
    (pass about twice the checkpoint size: the temporary file and the previous checkpoint).

    Raises ``CheckpointError`` naming the directory and what to change.
    """
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"output directory {directory!r} cannot be created ({exc}); pass a writable --output") from exc
    probe = os.path.join(directory, f".bitfast-write-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * min(max(need_bytes, 1), 1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise CheckpointError(
            f"output directory {directory!r} is not writable ({exc.strerror or exc}); pass a writable --output "
            "or free some space"
        ) from exc
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise CheckpointError(
            f"output directory {directory!r} has {free / 2**20:.1f} MiB free; checkpoints need about "
            f"{need_bytes / 2**20:.1f} MiB: free some space or pass another --output"
        )
