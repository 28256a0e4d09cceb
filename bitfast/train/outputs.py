"""A run's output directory: which checkpoint a run resumes from, and the refusal to replace
a run that is there without ``--resume`` or ``--overwrite``."""

from __future__ import annotations

import os
from collections.abc import Sequence

from bitfast.train import checkpoint as ckpt
from bitfast.train.config import TrainConfig

__all__ = ["RUN_FILES", "check_output", "resolve_resume", "restart_count", "start_run"]


# The files that make an --output directory hold a run.
RUN_FILES: tuple[str, ...] = ("last.pt", "metrics.jsonl", "final_eval.json")


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint a run of ``cfg`` continues from: ``cfg.resume`` (``"auto"``: OUTPUT/last.pt
    when it exists, else None), or OUTPUT/last.pt in a worker group that torchrun restarted
    (``--max-restarts``) when it exists, so that a restarted run resumes instead of restarting."""
    last = os.path.join(cfg.output, "last.pt")
    if cfg.resume == "auto" or (cfg.resume is None and restart_count()):
        return last if os.path.exists(last) else None
    return cfg.resume


def check_output(cfg: TrainConfig, files: Sequence[str] = RUN_FILES) -> str | None:
    """Fail at start when ``cfg.output`` holds a run (any of ``files``) that this run would
    replace: unless it resumes (``--resume``), ``cfg.overwrite`` (``--overwrite``) says to
    replace it, or ``--resume auto`` (or a torchrun restart) finds no checkpoint to continue
    (then the loop starts afresh and removes the stale files). Returns the checkpoint the run
    resumes from (``resolve_resume``), or None."""
    resume = resolve_resume(cfg)
    if resume:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return resume
    if cfg.resume == "auto" or restart_count():
        return None
    held = [name for name in files if os.path.exists(os.path.join(cfg.output, name))]
    if held and not cfg.overwrite:
        raise ckpt.CheckpointError(
            f"--output {cfg.output} holds a run ({', '.join(held)}): pass --resume auto to continue it, --overwrite to "
            "replace it, or another --output"
        )
    return None


def start_run(cfg: TrainConfig, files: Sequence[str] = RUN_FILES) -> str | None:
    """What every training command does first, before any work: check every option
    (``cfg.validate()``), make the data folders absolute (checkpoints then find them from any
    directory) and check the output directory (``check_output``). Returns the checkpoint the
    run resumes from, or None."""
    cfg.validate()
    if cfg.data not in (None, "digits"):
        cfg.data = os.path.abspath(cfg.data)
    if cfg.val_data is not None:
        cfg.val_data = os.path.abspath(cfg.val_data)
    return check_output(cfg, files)
