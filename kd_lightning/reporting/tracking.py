"""Weights & Biases tracking for kd-distill jobs: one W&B run per job, grouped per sweep, resumed with
the checkpoint it continues, offline when W&B has no credentials or cannot be reached.

``wandb`` is an optional extra (``pip install -e ".[wandb]"``): it is imported only when a run starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from kd_lightning.engine.caching.store import write_text_atomic
from kd_lightning.engine.multirun import in_multirun

log = logging.getLogger(__name__)

#: Written into the run directory: the W&B run id, reused when a later job resumes this run's checkpoint.
RUN_ID_FILE = "wandb_run_id"

_OFFLINE_MODES = ("offline", "dryrun", "disabled")


def sweep_group() -> str | None:
    """The default W&B group: in a multirun, the sweep directory's name (one group per sweep); else None."""
    if not in_multirun():
        return None
    return Path(HydraConfig.get().sweep.dir).name


def unreachable_marker() -> Path | None:
    """In a multirun, a file in the sweep directory that says W&B was out of reach for an earlier job, so
    later jobs (in this process or another) go offline at once instead of waiting out ``init_timeout``."""
    if not in_multirun():
        return None
    return Path(HydraConfig.get().sweep.dir) / ".wandb_unreachable"


def resumed_run_id(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The W&B run id of the run whose checkpoint ``ckpt_path`` resumes (``<its run dir>/wandb_run_id``).

    ``last`` and ``auto`` name this run dir's ``checkpoints/last.ckpt`` (``auto`` without one is a fresh run);
    a checkpoint path belongs to the run dir above its ``checkpoints/`` folder.
    """
    if ckpt_path is None:
        return None
    checkpoint = run_dir / "checkpoints" / "last.ckpt" if ckpt_path in ("last", "auto") else Path(ckpt_path)
    id_file = checkpoint.resolve().parent.parent / RUN_ID_FILE
    return id_file.read_text().strip() if checkpoint.is_file() and id_file.is_file() else None


def has_credentials() -> bool:
    """Whether W&B credentials are configured (WANDB_API_KEY, an identity token, ~/.netrc or a settings
    file), checked without the network."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    return bool(
        os.environ.get("WANDB_API_KEY")
        or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
        or wbauth.read_netrc_auth(host=settings.base_url)
        or settings.api_key
    )


class WandbRunLogger(WandbLogger):
    """A :class:`WandbLogger` that makes each kd-distill job exactly one W&B run.

    - ``group`` defaults to the sweep directory's name in a multirun, so a sweep's jobs form one group.
    - ``ckpt_path`` is the job's ``ckpt_path``: resuming a checkpoint continues the W&B run that wrote it
      (its id is kept in ``<run dir>/wandb_run_id``), which a requeued SLURM job relies on.
    - The run starts on first use. Without credentials, or when W&B cannot be reached or refuses them,
      it logs offline under ``<save_dir>/wandb`` (upload later with ``wandb sync``) after one warning;
      in a sweep, once one job found W&B out of reach, the later jobs go offline without trying.
    - A run still open in this process (left by an earlier job that failed) is finished first, and
      :func:`finish_runs` finishes this one at the end of the job, so jobs never merge.
    """

    def __init__(
        self,
        save_dir: str,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        job_type: str | None = None,
        offline: bool = False,
        log_model: bool | str = False,
        ckpt_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            project=project,
            entity=entity,
            group=group or sweep_group(),
            tags=list(tags),
            job_type=job_type,
            offline=offline,
            log_model=log_model,
            id=resumed_run_id(ckpt_path, Path(save_dir)),
            **kwargs,
        )
        # Lightning passes anonymous=None, which wandb 0.31 warns about on every run (the setting is gone).
        self._wandb_init.pop("anonymous")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run, started on first use (offline if W&B is out of reach)."""
        if self._experiment is not None:
            return self._experiment
        import wandb
        from wandb.errors import AuthenticationError, CommError

        if wandb.run is not None:
            wandb.finish(exit_code=1)
        marker = unreachable_marker()
        if not self.is_offline and not has_credentials():
            self._go_offline("no W&B credentials (set WANDB_API_KEY or run `wandb login`)")
        elif not self.is_offline and marker is not None and marker.is_file():
            self._go_offline(f"W&B could not be reached by an earlier job of this sweep ({marker.read_text()})")
        try:
            run = super().experiment
        except (CommError, AuthenticationError) as error:
            reason = str(error).splitlines()[0]
            if marker is not None:
                write_text_atomic(marker, reason)
            self._go_offline(f"W&B could not be reached or refused the credentials ({reason})")
            run = super().experiment
        write_text_atomic(Path(self.save_dir, RUN_ID_FILE), run.id)
        return run

    @property
    def is_offline(self) -> bool:
        """Whether the run logs offline: ``offline=true``, WANDB_MODE, or after falling back."""
        mode = self._wandb_init.get("mode") or os.environ.get("WANDB_MODE", "")
        return self._offline or mode in _OFFLINE_MODES

    def _go_offline(self, reason: str) -> None:
        dropped = "; checkpoints are not uploaded (logger.wandb.log_model)" if self._log_model else ""
        log.warning(
            "logger.wandb: %s; logging offline to %s/wandb (upload with `wandb sync`)%s", reason, self.save_dir, dropped
        )
        self._log_model = False
        self._wandb_init["mode"] = "offline"  # not `self._offline`: Lightning would set WANDB_MODE process-wide


def summary_entries(summary: dict[str, Any]) -> dict[str, Any]:
    """The final :class:`~kd_lightning.reporting.summary.Summary` (``as_dict()``) as flat W&B summary keys:
    ``summary/<metric>`` and ``summary/<field>`` (``summary/seconds/total``, ``summary/scratch/test_acc``);
    the config is left out (it is the run's config)."""
    entries = {f"summary/{name}": value for name, value in summary["metrics"].items()}
    for key, value in summary.items():
        if key in ("metrics", "config"):
            continue
        if isinstance(value, dict):
            entries.update({f"summary/{key}/{name}": item for name, item in value.items()})
        else:
            entries[f"summary/{key}"] = value
    return entries


@rank_zero_only
def finish_runs(loggers: Iterable[Logger], summary: dict[str, Any]) -> None:
    """Write the final summary into each W&B run and finish it, so the next job starts its own run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary_entries(summary))
            logger.experiment.finish()
