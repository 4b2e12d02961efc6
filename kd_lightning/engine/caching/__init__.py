"""Storage shared by every cache: ``store`` (content-addressed keys, digests, verified arrays, atomic publishing).

Imported directly (``from kd_lightning.engine.caching.store import ...``); ``__all__`` names the module.
"""

__all__ = ["store"]
