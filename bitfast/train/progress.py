"""Progress of a run: the progress bar on stderr and the JSON-lines metrics file."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

__all__ = ["MetricsLog", "ProgressBar", "truncate_metrics"]


class ProgressBar:
    """A dependency-free progress bar on stderr: step/total, loss, lr, img/s and ETA.

    On a terminal it redraws one line; otherwise (logs, CI) it prints a line about every
    ``every_s`` seconds and at the end."""

    def __init__(self, total: int, *, start: int = 0, desc: str = "train", enabled: bool = True,
                 stream=None, every_s: float = 10.0) -> None:
        self.total, self.start, self.desc = total, start, desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last_print = 0.0

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(max(0, seconds))
        h, rem = divmod(seconds, 3600)
        return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"

    def line(self, step: int, **fields: float) -> str:
        """The text shown after ``step`` steps with ``fields`` (loss, lr, img_s ...)."""
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = 20
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        parts = [f"{self.desc} [{bar}] {step}/{self.total}"]
        for k, v in fields.items():
            if v is None:
                continue
            parts.append(f"{k} {v:.3g}" if k != "img/s" else f"{k} {v:.0f}")
        parts.append(f"elapsed {self._clock(elapsed)}")
        parts.append(f"ETA {self._clock(eta) if math.isfinite(eta) else '?'}")
        return " | ".join(parts)

    def update(self, step: int, **fields: float) -> None:
        """Show progress after ``step`` steps."""
        if not self.enabled:
            return
        now = time.perf_counter()
        text = self.line(step, **fields)
        if self.tty:
            self.stream.write("\r" + text.ljust(110))
            self.stream.flush()
        elif step >= self.total or now - self._last_print >= self.every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Appends JSON lines (one record per call) to ``path``; a no-op when ``path`` is None."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        """Append ``record`` (plus the wall-clock time) as one JSON line."""
        if self.path is None:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def read(path: str) -> list[dict]:
        """The records of a metrics file; for a step logged twice (a resumed run replays the
        steps after its last checkpoint) the later record wins."""
        records: dict[tuple, dict] = {}
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    records[(r.get("kind"), r.get("step"), r.get("split"))] = r
        return sorted(records.values(), key=lambda r: (r.get("step") or 0))


def truncate_metrics(path: str, step: int) -> None:
    """Drop the records after ``step`` from a metrics file (a resumed run writes them again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if (json.loads(line).get("step") or 0) <= step]
    if len(keep) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
