"""OmegaConf resolvers the configs use; registered when an entry point is imported."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def ensure_dir(path: str) -> str:
    """``${ensure_dir:/some/dir}``: create the directory (e.g. for a sweeper's SQLite file), return it."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ensure_dir"):
        OmegaConf.register_new_resolver("ensure_dir", ensure_dir)
