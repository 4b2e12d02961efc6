"""Function matching (Beyer et al. 2022): SignalAugmentation's transforms do what they state; the datamodule
augments training batches only, and teacher and student see the identical view; augment=None leaves every
batch as stored; the teacher cache and mixup with a hard-label loss are refused; a seed fixes the views."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import RunningStage
from omegaconf import OmegaConf

from kd_lightning.callbacks import AlphaWarmup
from kd_lightning.data import MNIST1DDataModule, SignalAugmentation
from kd_lightning.data.augment import AugmentDraw, roll
from kd_lightning.data.contract import check_cacheable, check_label_mixing
from kd_lightning.engine.caching.store import data_identity
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import DKD, DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config, tiny_trainer

#: Every transformation on, mixup included (the preset's amounts).
ALL_ON = {"max_shift": 4, "scale": 0.2, "shear": 1.0, "iid_noise": 0.1, "corr_noise": 0.3, "mixup_alpha": 1.0}
PRESET = [*TINY, "experiment=mnist1d_function_matching", "logger=none"]


def signals(batch: int = 16, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, length, generator=torch.Generator().manual_seed(seed))


# (c) each transformation does what it states -----------------------------------------------------------


def test_shift_is_a_per_sample_torch_roll_within_max_shift() -> None:
    x = signals(64)
    augment = SignalAugmentation(max_shift=3)
    torch.manual_seed(0)
    draw = augment.draw(x)
    assert draw.shift.abs().max() <= 3 and len(draw.shift.unique()) > 3  # several of -3..3 drawn
    out = augment.apply(x, draw)
    for row, k in zip(range(len(x)), draw.shift.tolist(), strict=True):
        assert torch.equal(out[row], torch.roll(x[row], k, dims=-1))
    explicit = torch.tensor([0, 1, -1, 39, 40, -41] + [5] * 58)
    expected = torch.stack([torch.roll(x[i], int(k), dims=-1) for i, k in enumerate(explicit)])
    assert torch.equal(roll(x, explicit), expected)


def test_scale_multiplies_each_sample_by_a_factor_in_range() -> None:
    x = signals(256)
    augment = SignalAugmentation(scale=0.4)
    draw = augment.draw(x)
    out = augment.apply(x, draw)
    assert torch.allclose(out, x * draw.scale.view(-1, 1, 1))
    assert draw.scale.min() >= 0.8 and draw.scale.max() <= 1.2 and draw.scale.std() > 0.05


def test_shear_subtracts_a_linear_ramp_of_slope_in_range() -> None:
    x = signals(256)
    augment = SignalAugmentation(shear=2.0)
    draw = augment.draw(x)
    delta = augment.apply(x, draw) - x
    ramp = torch.linspace(-0.5, 0.5, 40)
    assert torch.allclose(delta, -draw.shear.view(-1, 1, 1) * ramp, atol=1e-6)
    assert torch.allclose(delta[..., -1] - delta[..., 0], -draw.shear.view(-1, 1))  # the ramp spans 1
    assert draw.shear.abs().max() <= 1.0 and draw.shear.std() > 0.2


def test_iid_noise_has_the_configured_std_and_no_correlation() -> None:
    torch.manual_seed(0)
    noise = SignalAugmentation(iid_noise=0.5)(torch.zeros(4096, 1, 40))
    assert noise.std().item() == pytest.approx(0.5, rel=0.02) and abs(noise.mean().item()) < 0.01
    lag1 = (noise[..., 1:] * noise[..., :-1]).mean() / noise.var()
    assert abs(lag1.item()) < 0.02


def test_correlated_noise_has_the_configured_std_at_every_position_and_gaussian_correlation() -> None:
    torch.manual_seed(0)
    sigma = 1.0
    noise = SignalAugmentation(corr_noise=0.3, corr_noise_sigma=sigma)(torch.zeros(4096, 1, 40))
    assert noise.std().item() == pytest.approx(0.3, rel=0.02)
    per_position = noise.std(dim=(0, 1))  # circular smoothing: no weaker edges
    assert per_position.min() > 0.27 and per_position.max() < 0.33
    lag1 = (noise[..., 1:] * noise[..., :-1]).mean() / noise.var()
    assert lag1.item() == pytest.approx(math.exp(-1 / (4 * sigma**2)), abs=0.02)  # Gaussian kernel * itself


def test_mixup_is_a_convex_combination_with_a_permutation_of_the_batch() -> None:
    x = signals(32)
    augment = SignalAugmentation(mixup_alpha=0.4)
    torch.manual_seed(3)
    draw = augment.draw(x)
    assert 0.0 <= draw.lam <= 1.0 and torch.equal(draw.perm.sort().values, torch.arange(32))
    out = augment.apply(x, draw)
    assert torch.allclose(out, draw.lam * x + (1 - draw.lam) * x[draw.perm])
    assert torch.allclose(augment.apply(x, AugmentDraw(lam=1.0, perm=draw.perm)), x)
    # lambda ~ Beta(alpha, alpha): for alpha = 1, uniform (mean 1/2, variance 1/12).
    torch.manual_seed(0)
    uniform = SignalAugmentation(mixup_alpha=1.0)
    lams = torch.tensor([uniform.draw(x).lam for _ in range(2000)])
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02) and lams.var().item() == pytest.approx(1 / 12, rel=0.1)


def test_call_is_apply_of_draw_and_leaves_the_input_alone() -> None:
    x = signals()
    before = x.clone()
    augment = SignalAugmentation(**ALL_ON)
    torch.manual_seed(5)
    out = augment(x)
    torch.manual_seed(5)
    assert torch.equal(out, augment.apply(x, augment.draw(x)))
    assert torch.equal(x, before) and out.shape == x.shape and out.dtype == x.dtype and not torch.allclose(out, x)
    assert torch.equal(SignalAugmentation()(x), x)  # every knob 0: the identity


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"max_shift": -1}, r"^data\.augment\.max_shift=-1 must be >= 0"),
        ({"max_shift": 1.5}, r"^data\.augment\.max_shift=1\.5 must be int"),
        ({"iid_noise": -0.1}, r"^data\.augment\.iid_noise=-0\.1 must be a finite number >= 0"),
        ({"mixup_alpha": float("nan")}, r"^data\.augment\.mixup_alpha=nan must be a finite number"),
        ({"corr_noise_sigma": 0}, r"^data\.augment\.corr_noise_sigma=0 must be > 0"),
        ({"scale": 3.0}, r"^data\.augment\.scale=3\.0 would allow negative factors"),
    ],
)
def test_bad_knobs_are_refused_by_name(knobs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SignalAugmentation(**knobs)


# the datamodule, in a training run ---------------------------------------------------------------------


def datamodule(kd_home: Path, augment: object = None) -> MNIST1DDataModule:
    data = MNIST1DDataModule(str(kd_home / "data"), batch_size=32, return_index=True, augment=augment)
    data.prepare_data()
    data.setup()
    return data


class Batches(L.Callback):
    """The batches each stage's steps receive (after the transfer hooks)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[list[torch.Tensor]]] = {"train": [], "validate": [], "test": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen["train"].append([t.clone() for t in batch])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["validate"].append([t.clone() for t in batch])

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.seen["test"].append([t.clone() for t in batch])


def run(data: MNIST1DDataModule, seed: int = 0) -> tuple[dict, dict]:
    """Fit one epoch of 2 training batches and 1 validation batch, then test 1 batch; returns the batches per
    stage and the inputs the student and the teacher were called with, per stage."""
    L.seed_everything(seed, workers=True)
    student, teacher = MLP(hidden=16), ConvNet1D(channels=8).eval()
    model = DistillationModule(
        student=student,
        teacher=teacher,
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=1.0, temperature=1.0),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
    )
    batches = Batches()
    trainer = tiny_trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        num_sanity_val_steps=0,
        callbacks=[batches],
    )
    inputs: dict[str, dict[str, list[torch.Tensor]]] = {"student": {}, "teacher": {}}
    for name, net in (("student", student), ("teacher", teacher)):

        def record(module, args, name=name) -> None:
            stage = {RunningStage.TRAINING: "train", RunningStage.VALIDATING: "validate"}.get(trainer.state.stage)
            inputs[name].setdefault(stage or "test", []).append(args[0].detach().clone())

        net.register_forward_pre_hook(record)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    return batches.seen, inputs


def stored(data: MNIST1DDataModule, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = data.splits[split].tensors
    return x[index], y[index]


def test_teacher_and_student_see_the_identical_augmented_training_batch(kd_home: Path) -> None:
    """(a) every training step: one augmented view, fed to both models; targets and indices untouched."""
    data = datamodule(kd_home, ALL_ON)
    seen, inputs = run(data)
    assert len(seen["train"]) == 2
    assert len(inputs["student"]["train"]) == len(inputs["teacher"]["train"]) == 2
    for (x, y, index), to_student, to_teacher in zip(
        seen["train"], inputs["student"]["train"], inputs["teacher"]["train"], strict=True
    ):
        assert torch.equal(to_student, x) and torch.equal(to_teacher, x)
        original, labels = stored(data, "train", index)
        assert torch.equal(y, labels) and x.shape == original.shape
        assert (x - original).abs().mean() > 0.1  # augmented, not as stored


def test_validation_and_test_batches_are_not_augmented(kd_home: Path) -> None:
    """(b) the same run's validation and test batches are the stored samples, for both models."""
    data = datamodule(kd_home, ALL_ON)
    seen, inputs = run(data)
    for stage, split in (("validate", "val"), ("test", "test")):
        ((x, y, index),) = seen[stage]
        original, labels = stored(data, split, index)
        assert torch.equal(x, original) and torch.equal(y, labels)
        assert torch.equal(inputs["student"][stage][0], original)
        assert torch.equal(inputs["teacher"][stage][0], original)
    # ... nor the cache-filling loader or the example batch.
    ordered = next(iter(data.ordered_dataloader("train")))[0]
    assert torch.equal(ordered, data.splits["train"].tensors[0][: len(ordered)])
    assert torch.equal(data.example_input(), data.splits["val"].tensors[0][:2])


def test_augment_none_leaves_every_batch_as_stored(kd_home: Path, tmp_path: Path) -> None:
    """(d) today's behaviour: the hook returns the very batch, training inputs are the stored ones, the
    datamodule still allows the cache, and neither its identity nor the cache keys change."""
    data = datamodule(kd_home)
    batch = next(iter(data.train_dataloader()))
    assert data.on_after_batch_transfer(batch, 0) is batch
    seen, inputs = run(data)
    for x, y, index in seen["train"]:
        original, labels = stored(data, "train", index)
        assert torch.equal(x, original) and torch.equal(y, labels)
    assert all(torch.equal(a, b[0]) for a, b in zip(inputs["student"]["train"], seen["train"], strict=True))
    assert data.random_augmentation is False and not data.mixes_inputs
    check_cacheable(data, "teacher_cache")  # no error
    assert set(data.content_identity()) == {"dataset", "official_seed", "val_samples", "transfer_samples"}
    cfg = compose_config(tmp_path)
    assert cfg.data.augment is None and "augment" not in data_identity(cfg.data)


def test_same_seed_same_views_other_seed_other_views(kd_home: Path) -> None:
    """(g) the views come from the seeded global generator: a run is reproducible."""
    data = datamodule(kd_home, ALL_ON)
    first, again, other = run(data, seed=7)[0]["train"], run(data, seed=7)[0]["train"], run(data, seed=8)[0]["train"]
    assert len(first) == len(again) == 2
    for batch_a, batch_b in zip(first, again, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch_a, batch_b, strict=True))
    x = signals()
    augment = SignalAugmentation(**ALL_ON)
    views = []
    for seed in (1, 1, 2):
        L.seed_everything(seed)
        views.append(augment(x))
    assert torch.equal(views[0], views[1]) and not torch.allclose(views[0], views[2])
    assert not torch.equal(first[0][0], other[0][0])


def test_augment_from_a_mapping_a_target_config_or_a_callable(kd_home: Path) -> None:
    knobs = {"max_shift": 2, "mixup_alpha": 0.5}
    from_mapping = datamodule(kd_home, knobs).augment
    target = OmegaConf.create({"_target_": "kd_lightning.data.SignalAugmentation", **knobs})
    from_target = datamodule(kd_home, target).augment
    assert isinstance(from_mapping, SignalAugmentation) and from_mapping.config() == from_target.config()
    data = datamodule(kd_home, from_target)
    assert data.augment is from_target and data.random_augmentation is True and data.mixes_inputs
    assert data.content_identity()["augment"] == {"_target_": "kd_lightning.data.augment.SignalAugmentation"} | (
        from_target.config()
    )
    with pytest.raises(ConfigError, match=r"^data\.augment has a key SignalAugmentation does not take"):
        datamodule(kd_home, {"max_shfit": 2})
    with pytest.raises(ConfigError, match=r"^data\.augment=3 must be null, a mapping"):
        datamodule(kd_home, 3)


# refusals, before any training --------------------------------------------------------------------------


def test_teacher_cache_is_refused_with_augmentation_on(tmp_path: Path, kd_home: Path) -> None:
    """(e) cached teacher outputs would be stale: refused in preflight, before a teacher is trained."""
    for cache in ("memory", "disk"):
        with pytest.raises(ConfigError) as error:
            distill(compose_config(tmp_path / cache, [*PRESET, f"teacher_cache={cache}"]))
        message = str(error.value)
        assert message.startswith("teacher_cache needs inputs fixed per sample, but the datamodule")
        assert "declares random_augmentation=True" in message and message.endswith("set teacher_cache=none")
    assert not (tmp_path / "memory" / "teacher").exists()


def test_mixup_with_a_hard_label_loss_is_refused(tmp_path: Path, kd_home: Path) -> None:
    """(f) mixup keeps only the first sample's label: loss.alpha < 1 (or an alpha schedule) is refused, and so is a
    weighted term that reads the target class (DKD) at loss.alpha = 1."""
    with pytest.raises(ConfigError) as error:
        distill(compose_config(tmp_path / "a", [*PRESET, "loss.alpha=0.9"]))
    message = str(error.value)
    assert message.startswith("data.augment.mixup_alpha=1.0 mixes the inputs of two samples")
    assert "loss.alpha=0.9" in message and "set loss.alpha=1.0" in message and "mixup_alpha=0" in message
    with pytest.raises(ConfigError, match=r"^data\.augment\.mixup_alpha=1\.0 needs pure distillation.*AlphaWarmup"):
        distill(compose_config(tmp_path / "b", [*PRESET, "callbacks=alpha_warmup"]))
    assert not (tmp_path / "a" / "teacher").exists()

    hard = DistillationLoss({"kd": KLDivergence()}, alpha=0.5)
    no_mixup = MNIST1DDataModule(str(kd_home / "data"), augment={**ALL_ON, "mixup_alpha": 0.0})
    check_label_mixing(no_mixup, hard, [AlphaWarmup()])  # augmentation without mixup: labels stay right
    mixed = MNIST1DDataModule(str(kd_home / "data"), augment=ALL_ON)
    check_label_mixing(mixed, DistillationLoss({"kd": KLDivergence()}, alpha=1.0))  # pure distillation
    with pytest.raises(ConfigError, match=r"loss\.alpha=0\.5 weights the hard-label cross-entropy by 0\.5"):
        check_label_mixing(mixed, hard)
    labels = DistillationLoss({"kd": KLDivergence(), "dkd": DKD()}, alpha=1.0)  # no cross-entropy, DKD reads y
    with pytest.raises(ConfigError, match=r"mixup_alpha=1\.0 mixes .* and loss\.terms\.dkd reads the target class"):
        check_label_mixing(mixed, labels)
    check_label_mixing(mixed, DistillationLoss({"kd": KLDivergence(), "dkd": DKD()}, alpha=1.0, weights={"dkd": 0}))


def test_the_preset_builds_a_pure_distillation_run_with_mixup(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path, ["experiment=mnist1d_function_matching"])
    assert cfg.loss.alpha == 1.0 and cfg.trainer.max_epochs > 40 and cfg.scheduler.T_max == cfg.trainer.max_epochs
    data = instantiate(cfg.data)
    assert isinstance(data.augment, SignalAugmentation) and data.augment.max_shift > 0
    assert data.mixes_inputs and data.random_augmentation


def test_teachers_and_scratch_baselines_are_fitted_without_the_augmentation(tmp_path: Path) -> None:
    """Supervised fits (teacher, scratch student) train on plain labelled data: mixup with hard labels would
    teach wrong labels. So the function-matching preset reuses plain KD's cached teacher and baseline."""
    from kd_lightning.engine.instantiate import build
    from kd_lightning.recipes.fit import supervised_data

    matching = compose_config(tmp_path, ["experiment=mnist1d_function_matching"])
    plain = compose_config(tmp_path, ["experiment=mnist1d_kd_40ep"])
    assert build(matching.data, "data").augment is not None
    assert build(matching.data, "data", **supervised_data(matching.data)).augment is None
    assert data_identity(matching.data) == data_identity(plain.data)
