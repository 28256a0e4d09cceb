"""Training checkpoints: atomic writes, RNG state capture, start-of-run checks.

A training checkpoint is one ``torch.save`` file holding everything a run needs to continue
bit for bit: the model and optimizer state dicts, the EMA weights (when the optimizer keeps
them), the GradScaler state, the step, the random-number-generator states (Python, torch CPU,
every CUDA device, and the run's own generators) and the run's configuration.

Files are written atomically: to a temporary file in the same directory, flushed and
fsynced, then renamed over the target with ``os.replace``, so a crash or a full disk leaves
either the previous checkpoint or the new one, never a torn file. ``probe_output_dir`` checks
at the start of a run that the output directory is writable and has room, so a run fails
before its first step rather than at its first checkpoint an hour later.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "FORMAT",
    "check_compatible",
    "get_rng_state",
    "load_checkpoint",
    "probe_output_dir",
    "save_checkpoint",
    "set_rng_state",
    "state_dict_bytes",
]

# Stored in every checkpoint; bumped if the layout changes incompatibly.
FORMAT = "bitfast-train-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for what was asked (another model, class count,
    format), or an output directory that cannot hold checkpoints."""


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + ``os.replace``).

    ``state`` gets a ``"format"`` entry. Returns the path written. On any error the
    temporary file is removed and the previous file at ``path`` (if any) is left untouched.
    """
    path = os.fspath(path)
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: state must be a mapping; got {type(state).__name__}")
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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a training checkpoint written by ``save_checkpoint``.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a file that is
    not a bitfast training checkpoint (e.g. released weights: load those with
    ``bitfast.load_pretrained`` / ``--pretrained`` instead).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        # Our own files hold Python objects (config, RNG states): full unpickling.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"checkpoint {path!r} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is not a bitfast training checkpoint (format {FORMAT!r}); pretrained weights "
            "(.npz, timm or authors' files) are loaded with --pretrained / bitfast.load_pretrained"
        )
    return state


def check_compatible(state: Mapping[str, Any], *, model: str, num_classes: int, path: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` unless ``state`` (a loaded checkpoint) was written for
    ``model`` with ``num_classes`` classes; the message names both and what to change."""
    config = state.get("config") or {}
    saved_model = config.get("model")
    saved_classes = state.get("num_classes", config.get("num_classes"))
    if saved_model is not None and saved_model != model:
        raise CheckpointError(
            f"cannot resume from {path}: it was written for model {saved_model!r}, this run builds {model!r}; "
            f"pass --model {saved_model} or start a new run in another --output directory"
        )
    if saved_classes is not None and int(saved_classes) != int(num_classes):
        raise CheckpointError(
            f"cannot resume from {path}: it has a {saved_classes}-class head, this run's data has "
            f"{num_classes} classes; use the same data/classes or start a new run in another --output directory"
        )


def get_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The states of Python's ``random``, torch's CPU and CUDA generators and of the named
    ``generators`` (e.g. the MixUp generator), for ``set_rng_state``."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
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
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
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
