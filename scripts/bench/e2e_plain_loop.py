"""kd-distill's default recipe with a cached teacher, written as a plain PyTorch loop (no Lightning).

    python scripts/bench/e2e_plain_loop.py --teacher-weights W --table T --prepare data.batch_size=128
    python scripts/bench/e2e_plain_loop.py --teacher-weights W --table T --threads 1 data.batch_size=128 \
        trainer.max_epochs=20

The baseline (B) of ``scripts/bench/e2e.py``, run as its own process. The trailing arguments are Hydra
overrides of ``conf/distill.yaml`` (the same ones given to kd-distill), composed with ``hydra.compose``;
the data lives under ``$KD_LIGHTNING_HOME`` (where kd-distill generated it). It builds the same student
and teacher (``hydra.utils.instantiate``), loads the teacher's weights from ``--teacher-weights`` (the
safetensors file kd-distill cached), reads the same MNIST-1D arrays, serves them as kd-distill does (whole
batches gathered at once, as :mod:`kd_lightning.data.tensors` does; nothing of Lightning is imported), and then:

- ``--prepare``: one teacher pass over the training set in index order, saved to ``--table`` (float16,
  like ``teacher_cache.dtype``); run once, before any timed run (kd-distill's warm-up does the same).
- otherwise: ``trainer.max_epochs`` epochs of KD (:func:`kd_loss` with conf/loss/kd.yaml's ``loss.alpha``
  and ``loss.temperature``, the only loss written here; AdamW from ``optimizer``, shuffled batches of
  ``data.batch_size``) with the teacher's training logits looked up in the table by sample index; a
  validation pass every epoch (the teacher's validation logits computed once and reused); a test pass at
  the end with the last weights. ``--threads`` sets ``torch.set_num_threads`` (``runtime.cpu_threads`` is
  not read: e2e.py passes the count kd-distill used). Prints one JSON line with the accuracies and the
  thread count.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
UNLABELLED = -1  # the target of a transfer sample


class BatchedTensorDataset(TensorDataset):
    """Batches gathered whole (one index per tensor), as kd_lightning's MNIST-1D datamodule serves them."""

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        rows = torch.as_tensor(indices)
        return [tensor[rows] for tensor in self.tensors]


def batched_loader(dataset: BatchedTensorDataset, **options: object) -> DataLoader:
    return DataLoader(dataset, collate_fn=lambda batch: batch, **options)


def kd_loss(student: Tensor, teacher: Tensor, y: Tensor, alpha: float, temperature: float) -> Tensor:
    """Hinton et al.'s loss, as conf/loss/kd.yaml configures it: ``(1 - alpha) * CE`` over the labelled
    samples of the batch + ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over all."""
    labelled = y != UNLABELLED
    ce = F.cross_entropy(student[labelled], y[labelled]) if labelled.any() else student.sum() * 0
    kl = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def load_config(overrides: list[str]) -> DictConfig:
    """``conf/distill.yaml`` with ``overrides``; ``paths.home`` from ``$KD_LIGHTNING_HOME`` as kd-distill has it."""
    home = os.environ.get("KD_LIGHTNING_HOME") or str(Path.home() / ".kd_lightning")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("distill", overrides=[f"paths.home={home}", *overrides])


def load_splits(data: DictConfig) -> dict[str, BatchedTensorDataset]:
    """The MNIST-1D arrays kd-distill generated (official train/test, validation, unlabelled transfer set):
    ``train`` as ``(x, y, index)``, ``val`` and ``test`` as ``(x, y)``."""
    root = Path(data.data_dir)
    official = np.load(root / "mnist1d_official.npz")
    val = np.load(root / f"mnist1d_val_{data.val_samples}.npz")
    x_train, y_train = official["x"], official["y"]
    if data.transfer_samples:
        transfer = np.load(root / f"mnist1d_transfer_{data.transfer_samples}.npz")["x"]
        x_train = np.concatenate([x_train, transfer])
        y_train = np.concatenate([y_train, np.full(len(transfer), UNLABELLED)])

    def tensors(x: np.ndarray, y: np.ndarray) -> list[Tensor]:
        return [torch.as_tensor(x, dtype=torch.float32).unsqueeze(1), torch.as_tensor(y, dtype=torch.long)]

    train = tensors(x_train, y_train)
    return {
        "train": BatchedTensorDataset(*train, torch.arange(len(x_train))),
        "val": BatchedTensorDataset(*tensors(val["x"], val["y"])),
        "test": BatchedTensorDataset(*tensors(official["x_test"], official["y_test"])),
    }


def frozen_teacher(cfg: DictConfig, weights: Path) -> nn.Module:
    teacher = instantiate(cfg.teacher.model)
    teacher.load_state_dict(load_file(str(weights)))
    return teacher.eval().requires_grad_(False)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader) -> list[Tensor]:
    """The model's logits per batch of ``loader`` (eval mode, no gradients)."""
    model.eval()
    return [model(batch[0]) for batch in loader]


def prepare_table(teacher: nn.Module, train: BatchedTensorDataset, path: Path) -> None:
    """The teacher's logits for every training sample, in index order, as a float16 ``.npy``."""
    logits = torch.cat(predict(teacher, batched_loader(train, batch_size=512)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, logits.numpy().astype(np.float16))


def accuracy(logits: list[Tensor], targets: list[Tensor]) -> float:
    return float(torch.cat([z.argmax(-1) for z in logits]).eq(torch.cat(targets)).float().mean())


def distill(
    cfg: DictConfig, teacher: nn.Module, splits: dict[str, BatchedTensorDataset], table: Tensor
) -> dict[str, float]:
    """Train the student with KD for ``trainer.max_epochs`` epochs; validation accuracies and the test accuracy."""
    batch = cfg.data.batch_size
    val = batched_loader(splits["val"], batch_size=batch)
    val_targets = [y for _, y in val]
    teacher_val = predict(teacher, val)  # computed once, reused every epoch
    # Seeded where kd-distill seeds: before the student is built and again before training.
    torch.manual_seed(cfg.seed)
    student = instantiate(cfg.student.model)
    torch.manual_seed(cfg.seed)
    alpha, temperature = cfg.loss.alpha, cfg.loss.temperature
    optimizer = instantiate(cfg.optimizer)(params=list(student.parameters()))
    train = batched_loader(splits["train"], batch_size=batch, shuffle=True)
    best = 0.0
    for _ in range(cfg.trainer.max_epochs):
        student.train()
        for x, y, index in train:
            loss = kd_loss(student(x), table[index], y, alpha, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        student_val = predict(student, val)
        val_acc = accuracy(student_val, val_targets)
        best = max(best, val_acc)
    test = batched_loader(splits["test"], batch_size=batch)
    return {
        "test_acc": accuracy(predict(student, test), [y for _, y in test]),
        "val_acc": val_acc,
        "val_acc_best": best,
        "val_agreement": accuracy(student_val, [z.argmax(-1) for z in teacher_val]),
        "teacher_val_acc": accuracy(teacher_val, val_targets),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-weights", type=Path, required=True, help="the teacher's model.safetensors")
    parser.add_argument("--table", type=Path, required=True, help="the teacher's training logits (.npy)")
    parser.add_argument("--prepare", action="store_true", help="compute --table and exit")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/distill.yaml")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    if cfg.scheduler:
        raise SystemExit("e2e_plain_loop.py: only scheduler=none (a constant learning rate) is written here")
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_splits(cfg.data)
    teacher = frozen_teacher(cfg, args.teacher_weights)
    if args.prepare:
        prepare_table(teacher, splits["train"], args.table)
        return
    table = torch.from_numpy(np.load(args.table)).float()
    if table.shape[0] != len(splits["train"]):
        raise SystemExit(f"{args.table} has {table.shape[0]} rows for {len(splits['train'])} training samples")
    result = distill(cfg, teacher, splits, table)
    print(json.dumps({**result, "threads": torch.get_num_threads(), "epochs": cfg.trainer.max_epochs}))


if __name__ == "__main__":
    main()
