"""Third-party notices that say nothing to a kd_lightning user, silenced; real warnings stay visible.

Lightning prints, for every Trainer (a run builds three: teacher, student, scratch baseline), a tip to
install ``litlogger``, the accelerators it did not find and "Seed set to 42"; torch's pytree module
warns that Lightning uses a deprecated class; Optuna colours its log lines even in a log file.
kd_lightning prints the run directory and a summary itself.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

#: Lightning INFO lines dropped (prefixes of the message).
DROPPED_INFO = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",
    "`Trainer.fit` stopped:",
    "Loaded model weights from the checkpoint",  # follows "Restoring states from ...", which stays
)
#: torch.utils._pytree's deprecation notice, raised by Lightning's own code.
PYTREE_NOTICE = "`isinstance(treespec, LeafSpec)` is deprecated"
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


class DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DROPPED_INFO)


def quiet_third_party() -> None:
    """Install the filters (idempotent); without a terminal, ask colour loggers (Optuna's colorlog) for
    plain text (``NO_COLOR``), so log files hold no ANSI escape codes."""
    if not sys.stderr.isatty():
        os.environ.setdefault("NO_COLOR", "1")
    # The same filter for processes ddp_spawn starts (they inherit the environment, not the filters).
    pytree = f"ignore:{PYTREE_NOTICE.split(',')[0]}:FutureWarning"  # PYTHONWARNINGS splits on commas
    inherited = os.environ.get("PYTHONWARNINGS", "")
    if pytree not in inherited:
        os.environ["PYTHONWARNINGS"] = f"{inherited},{pytree}" if inherited else pytree
    warnings.filterwarnings("ignore", message=re.escape(PYTREE_NOTICE), category=FutureWarning)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNotices) for f in logger.filters):
            logger.addFilter(DropNotices())
