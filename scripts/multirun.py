"""What the result scripts share: one ``kd-distill -m`` multirun over seeds, and mean ± std of accuracies.

Imported by the scripts beside it (``python scripts/<script>.py`` puts this folder on ``sys.path``) and, for
``mean_std``, by the LM studies (experiments/llm_common.py puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KD_DISTILL = Path(sys.executable).parent / "kd-distill"
REPO = Path(__file__).resolve().parents[1]


def provenance() -> str:
    """Where and when a table is measured, for its Command line: ``commit 1a2b3c4, 2026-12-08`` (``+ uncommitted
    changes`` when the tree differs from the commit: such a table describes no commit until re-run)."""
    import datetime

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty}, {datetime.date.today()}"


def run_seeds(overrides: list[str], seeds: list[int], sweep_dir: Path, home: Path) -> list[dict]:
    """The summaries of ``kd-distill -m <overrides> seed=<seeds>`` run into ``sweep_dir`` with KD_LIGHTNING_HOME
    ``home`` (shared by the calls of one script: teachers and scratch students are trained once per seed); a
    sweep that finished in an earlier call with the same directory is read, not rerun."""
    done = sorted(sweep_dir.glob("*/summary.json"))
    if len(done) == len(seeds):
        return [json.loads(path.read_text()) for path in done]
    command = [
        str(KD_DISTILL),
        "-m",
        *overrides,
        f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={sweep_dir}",
        "+trainer.enable_progress_bar=false",
    ]
    print("$ kd-distill", " ".join(command[1:]), flush=True)
    env = {**os.environ, "KD_LIGHTNING_HOME": str(home)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/summary.json"))]


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (percent by default), ``digits`` decimals (std 0 for one value)."""
    scaled = [scale * v for v in values]
    std = statistics.stdev(scaled) if len(scaled) > 1 else 0.0
    return f"{statistics.mean(scaled):.{digits}f} ± {std:.{digits}f}"
