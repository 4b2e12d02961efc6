"""CIFAR-10/100 from their on-disk pickles, sklearn's digits, and the CIFAR crop + flip augmentation."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data import CIFARDataModule, CropFlip, DigitsDataModule
from kd_lightning.data.cifar_files import LAYOUTS
from kd_lightning.engine.errors import ConfigError
from tests.image_fixtures import CIFAR100_FOLDER, write_cifar10, write_cifar100

MEAN, STD = LAYOUTS["cifar100"].mean, LAYOUTS["cifar100"].std


def normalised(raw: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """The reference normalisation: uint8 rows (N, 3072) to ``(x / 255 - mean) / std`` images (N, 3, 32, 32)."""
    x = torch.from_numpy(raw.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0)
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return ((x - m.view(1, 3, 1, 1)) / s.view(1, 3, 1, 1)).float()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar100(root)


def test_cifar100_splits_follow_the_files_and_normalise(cifar_root) -> None:
    root, arrays = cifar_root
    dm = CIFARDataModule(str(root), val_samples=100, return_index=True, batch_size=16)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [200, 100, 100]
    assert dm.label_names[:2] == ["fine0", "fine1"]
    x, y, index = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(x, normalised(arrays["test_data"][:16]), atol=1e-6, rtol=0)
    assert y.tolist() == arrays["test_fine"][:16].tolist() and index.tolist() == list(range(16))
    # The hold-out is class-balanced (100 of 100 classes, one each here), disjoint from train, and deterministic.
    train_y, val_y = dm.splits["train"].tensors[1], dm.splits["val"].tensors[1]
    assert sorted(val_y.tolist()) == list(range(100))
    seen = {tuple(r) for r in dm.splits["train"].tensors[0].flatten(1)[:, :8].tolist()}
    assert not seen & {tuple(r) for r in dm.splits["val"].tensors[0].flatten(1)[:, :8].tolist()}
    again = CIFARDataModule(str(root), val_samples=100)
    again.setup()
    assert torch.equal(again.splits["val"].tensors[0], dm.splits["val"].tensors[0])
    assert len(train_y) == 200 and dm.num_train_samples == 200


def test_cifar_published_protocol_validates_on_test_and_coarse_labels(cifar_root) -> None:
    root, arrays = cifar_root
    dm = CIFARDataModule(str(root), val_samples=0)
    dm.setup()
    assert torch.equal(dm.splits["val"].tensors[0], dm.splits["test"].tensors[0])
    assert len(dm.splits["train"]) == 300
    coarse = CIFARDataModule(str(root), label="coarse", num_classes=20, val_samples=0)
    coarse.setup()
    assert coarse.splits["train"].tensors[1].tolist() == (arrays["train_fine"] % 20).tolist()
    with pytest.raises(ConfigError, match=r"data\.num_classes=100 but cifar100 \(coarse\) has 20"):
        CIFARDataModule(str(root), label="coarse")


def test_cifar10_reads_the_five_batches_in_order(tmp_path: Path) -> None:
    arrays = write_cifar10(tmp_path)
    dm = CIFARDataModule(str(tmp_path), dataset="cifar10", num_classes=10, val_samples=0)
    dm.setup()
    mean, std = LAYOUTS["cifar10"].mean, LAYOUTS["cifar10"].std
    torch.testing.assert_close(dm.example_input(), normalised(arrays["test_data"][:2], mean, std), atol=1e-6, rtol=0)
    stored = dm.splits["train"].tensors[0].flatten(1).numpy()
    assert np.array_equal(stored, arrays["train_data"])
    assert dm.label_names == [f"class{i}" for i in range(10)]


def test_cifar_identity_follows_content_not_location(cifar_root, tmp_path: Path) -> None:
    root, _ = cifar_root
    base = CIFARDataModule(str(root)).content_identity()
    copy = tmp_path / "elsewhere"
    write_cifar100(copy)
    assert CIFARDataModule(str(copy), batch_size=7).content_identity() == base
    other = tmp_path / "other"
    write_cifar100(other, seed=1)
    assert CIFARDataModule(str(other)).content_identity()["files"] != base["files"]
    assert CIFARDataModule(str(root), augment={"padding": 2}).content_identity() != base


def test_missing_cifar_names_the_layout_and_never_downloads(tmp_path: Path) -> None:
    dm = CIFARDataModule(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"data\.root=.*cifar-100-python/\{train, test, meta\}.*data\.download=true"):
        dm.prepare_data()
    assert not (tmp_path / "nothing").exists()


def test_download_checks_the_published_md5_before_unpacking(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "source"
    write_cifar100(source)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / CIFAR100_FOLDER, arcname=CIFAR100_FOLDER)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    layout = LAYOUTS["cifar100"]
    monkeypatch.setitem(
        LAYOUTS, "cifar100", type(layout)(**{**layout.__dict__, "url": archive.as_uri(), "md5": "0" * 32})
    )
    with pytest.raises(ConfigError, match="not the published"):
        CIFARDataModule(str(tmp_path / "bad"), download=True).prepare_data()
    assert not (tmp_path / "bad" / CIFAR100_FOLDER).exists()
    monkeypatch.setitem(LAYOUTS, "cifar100", type(layout)(**{**layout.__dict__, "url": archive.as_uri(), "md5": md5}))
    dm = CIFARDataModule(str(tmp_path / "good"), download=True, val_samples=0)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) == 300


def test_a_tampered_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    pickle.dump({b"data": Exploit(), b"fine_labels": []}, buffer, protocol=2)
    (tmp_path / CIFAR100_FOLDER / "train").write_bytes(buffer.getvalue())
    dm = CIFARDataModule(str(tmp_path))
    with pytest.raises(ConfigError, match=r"not a readable CIFAR batch file.*may not reference"):
        dm.setup()
    assert not marker.exists()


def crop_flip_reference(x: torch.Tensor, top, left, flip, padding: int, fill: list[float]) -> torch.Tensor:
    """One image at a time: pad with ``fill`` per channel, slice the crop, mirror it."""
    out = []
    for i in range(x.shape[0]):
        channels = [F.pad(x[i, c], (padding,) * 4, value=fill[c]) for c in range(x.shape[1])]
        padded = torch.stack(channels)
        crop = padded[:, int(top[i]) : int(top[i]) + x.shape[2], int(left[i]) : int(left[i]) + x.shape[3]]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_a_per_image_reference_and_covers_every_offset() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    augment = CropFlip(padding=2, flip=True, fill=[-1.0, 0.5, 2.0])
    draw = augment.draw(x, generator=torch.Generator().manual_seed(3))
    out = augment.apply(x, draw)
    assert torch.equal(out, crop_flip_reference(x, draw.top, draw.left, draw.flip, 2, [-1.0, 0.5, 2.0]))
    assert set(draw.top.tolist()) == set(range(5)) and set(draw.flip.tolist()) == {0, 1}
    # Replaying stored per-sample values gives the same view; no padding and no flip is the identity.
    assert torch.equal(augment.apply_per_sample(x, draw.per_sample()), out)
    assert torch.equal(CropFlip(padding=0, flip=False)(x), x)


def test_cifar_augments_training_batches_with_black_padding(cifar_root) -> None:
    root, _ = cifar_root
    dm = CIFARDataModule(str(root), augment={"padding": 4, "flip": True})
    assert dm.random_augmentation is True
    black = [-m / s for m, s in zip(MEAN, STD, strict=True)]
    assert dm.augment.fill == pytest.approx(black)
    assert CIFARDataModule(str(root)).random_augmentation is False


def test_digits_splits_are_stratified_standardised_and_resizable() -> None:
    pytest.importorskip("sklearn")
    dm = DigitsDataModule()
    dm.setup()
    sizes = [len(dm.splits[s]) for s in ("train", "val", "test")]
    assert sizes == [1097, 300, 400]
    for split in ("val", "test"):
        assert torch.bincount(dm.splits[split].tensors[1], minlength=10).min() >= 25  # every class, about evenly
    train = dm.splits["train"].tensors[0]
    assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 1e-3
    big = DigitsDataModule(resolution=32, channels=3)
    big.setup()
    first = big.splits["val"].tensors[0][:1]
    assert first.shape == (1, 3, 32, 32)
    expected = F.interpolate(dm.splits["val"].tensors[0][:1], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(first[:, :1], expected)
    assert torch.equal(first[:, 0], first[:, 2])
    with pytest.raises(ConfigError, match=r"data\.channels=2"):
        DigitsDataModule(channels=2)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda b: {**b, b"labels": b[b"labels"][:-3]}, "images but"),
        (lambda b: {**b, b"data": b[b"data"].astype(np.float32)}, "float32 pixels"),
        (lambda b: {**b, b"labels": [*b[b"labels"][:-1], 10]}, "span"),
    ],
    ids=["fewer-labels-than-images", "float-pixels", "label-out-of-range"],
)
def test_a_cifar_file_whose_labels_do_not_line_up_is_refused(tmp_path: Path, edit, match: str) -> None:
    from tests.image_fixtures import CIFAR10_FOLDER, _dump

    write_cifar10(tmp_path)
    test_batch = tmp_path / CIFAR10_FOLDER / "test_batch"
    with open(test_batch, "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    _dump(test_batch, edit(batch))
    with pytest.raises(ConfigError, match=match):
        CIFARDataModule(str(tmp_path), dataset="cifar10", num_classes=10, val_samples=0).setup()


def test_a_holdout_that_leaves_no_training_image_names_data_val_samples(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=2)  # 10 training images, one per class
    with pytest.raises(ConfigError, match=r"data\.val_samples=5000 holds out every one of the 10"):
        CIFARDataModule(str(tmp_path), dataset="cifar10", num_classes=10, val_samples=5000).setup()
