"""OmegaConf resolvers the configs use; registered when an entry point is imported."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from kd_lightning.engine.metrics import direction


def ensure_dir(path: str) -> str:
    """``${ensure_dir:/some/dir}``: create the directory (e.g. for a sweeper's SQLite file), return it."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def run_stamp() -> str:
    """``${run_stamp:}``: the run directory's leaf. Under ``torchrun --rdzv-id=<id>`` every process (on
    every node) gets ``torchrun-<id>``, so they share one run directory; otherwise the start time to the
    microsecond (a new directory per run)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return f"torchrun-{run_id}"
    return datetime.now().strftime("%H-%M-%S-%f")


def home(default: str) -> str:
    """``${kd_home:<default>}``: ``$KD_LIGHTNING_HOME`` unless unset or empty (an empty value would put
    data and caches at the filesystem root). A home that is a file or not writable ends the program with
    one line (Hydra creates the run directory inside it before any kd_lightning code runs)."""
    path = os.environ.get("KD_LIGHTNING_HOME") or default
    problem = unwritable(Path(path))
    if problem:
        print(
            f"{Path(sys.argv[0]).name}: error: paths.home={path} {problem}; set KD_LIGHTNING_HOME to a writable "
            "directory",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return path


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot hold kd_lightning's files (None when it can: it exists and is writable, or it
    can be created)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"is inside a file ({existing}), not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"is not writable ({existing} is read-only for this user)"
    return None


def register_resolvers() -> None:
    resolvers = {"ensure_dir": ensure_dir, "run_stamp": run_stamp, "kd_home": home, "metric_direction": direction}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
