"""Cost of one teacher-output cache lookup: 256 random rows of a memory-mapped float16 table of
24,000 x 10 logits (the default MNIST-1D training set), as ``DistillationModule`` does per batch.

    python scripts/bench/cache_lookup.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kd_lightning.teacher.outputs import TeacherOutputCache


def main(rows: int = 24_000, classes: int = 10, batch: int = 256, lookups: int = 1000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "logits.npy"
        np.save(path, np.random.default_rng(0).standard_normal((rows, classes)).astype(np.float16))
        cache = TeacherOutputCache("memory")
        cache.tables["train"] = {"logits": np.load(path, mmap_mode="r")}
        index = torch.randperm(rows)[:batch]
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(lookups):
                cache.logits("train", index)
            times.append((time.perf_counter() - start) / lookups)
    print(f"lookup of {batch} rows: {statistics.median(times) * 1e6:.1f} us (median of 5 x {lookups})")


if __name__ == "__main__":
    main()
