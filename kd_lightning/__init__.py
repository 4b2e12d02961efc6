"""kd_lightning: knowledge distillation with PyTorch Lightning and Hydra.

Importing the package loads nothing: the subpackages are imported where they are used (``engine``, ``models``,
``losses``, ``data``, ``llm``, ``teacher``, ``methods``, ``callbacks``, ``reporting``, ``recipes``, ``cli``:
the layer order of ``docs/architecture.md``), and ``__version__`` is read from the installed distribution's
metadata on first access (``setup.cfg``'s ``metadata.version``; ``"0+unknown"`` for a source tree that is not
installed), so the entry points' start-up does not pay for ``importlib.metadata``.
"""

__all__ = ["__version__"]

#: The version of a source tree that is not installed (no distribution metadata to read).
UNKNOWN_VERSION = "0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("kd-lightning")
        except PackageNotFoundError:
            found = UNKNOWN_VERSION
        globals()["__version__"] = found  # read once
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
