"""No host read of a device value in a training step: the non-finite check is recorded on the device and read
every ``nonfinite_check_every`` steps (counted through a patched torch.Tensor on the CPU, and with CUDA's sync
debug mode where a GPU is available); a NaN is still reported with its first step and parts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.data import MNIST1DDataModule
from kd_lightning.engine.errors import ConfigError, TrainingDiverged
from kd_lightning.engine.nonfinite import ACCELERATOR_EVERY, NonFiniteGuard, steps_between_checks
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import DKD, DistillationLoss, FitNets, KLDivergence
from kd_lightning.methods import Method
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.methods.multi_teacher import MultiTeacherDistillation
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.recipes.llm_preflight import check_values
from kd_lightning.teacher.outputs import TeacherOutputCache
from tests.conftest import tiny_trainer
from tests.test_llm_module import TinyData, make_module

#: Every way Python code reads a tensor's value on the host.
READS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy", "__index__")
EVERY = 4


class HostReads:
    """Host reads of tensors per training step, through patched ``torch.Tensor`` methods: ``steps[i]`` those
    of step ``i`` outside the non-finite check, ``checks[i]`` those of the check read in step ``i``,
    ``once[i]`` those of one-time checks (an LM's head check); ``readers[i]``: the files whose code read in
    step ``i``; ``foreign``: the files outside kd_lightning (and torch) whose code read in a step, e.g. Hugging
    Face's attention-mask shortcut (not counted in ``steps``)."""

    def __init__(self) -> None:
        self.where: str | None = None
        self.steps: list[int] = []
        self.checks: list[int] = []
        self.once: list[int] = []
        self.readers: list[set[str]] = []
        self.foreign: set[str] = set()

    def record(self, caller: str) -> None:
        counts = {"step": self.steps, "check": self.checks, "once": self.once}.get(self.where or "")
        if counts is None:
            return
        reader = "/".join(Path(caller).parts[-2:])
        if self.where == "step" and "site-packages" in caller and "/torch/" not in caller:
            self.foreign.add(reader)
            return
        counts[-1] += 1
        if self.where == "step":
            self.readers[-1].add(reader)

    @contextmanager
    def inside(self, where: str) -> Iterator[None]:
        outer, self.where = self.where, where
        try:
            yield
        finally:
            self.where = outer

    def wrap(self, owner: Any, name: str, where: str, new_step: bool = False) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if new_step:
                for counts in (self.steps, self.checks, self.once):
                    counts.append(0)
                self.readers.append(set())
            elif self.where is None:  # a check outside a step (epoch or training end): not counted
                return original(*args, **kwargs)
            with self.inside(where):
                return original(*args, **kwargs)

        setattr(owner, name, wrapped)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[Method], HostReads]:
    """Patch ``torch.Tensor``'s reads to count, and wrap a method's step and hooks to attribute them."""

    def watch(module: Method) -> HostReads:
        reads = HostReads()
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self: torch.Tensor, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
                reads.record(sys._getframe(1).f_code.co_filename)
                return __original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        reads.wrap(module, "training_step", "step", new_step=True)
        for hook in ("on_before_optimizer_step", "on_train_batch_end"):
            reads.wrap(module, hook, "step")
        reads.wrap(module.nonfinite_guard, "check", "check")
        if hasattr(module, "check_heads"):
            reads.wrap(module, "check_heads", "once")
        return reads

    return watch


@pytest.fixture(scope="module")
def data(kd_home: Path) -> MNIST1DDataModule:
    datamodule = MNIST1DDataModule(str(kd_home / "data"), batch_size=32, transfer_samples=0, return_index=True)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def cnn(channels: int, seed: int) -> ConvNet1D:
    torch.manual_seed(seed)
    return ConvNet1D(channels=channels)


def kd(every: int | str = EVERY, cache: bool = True, **runtime: Any) -> DistillationModule:
    """The default run's method: logits KD, the teacher's logits from the memory cache (teacher_cache=auto)."""
    return DistillationModule(
        student=MLP(hidden=16),
        teacher=cnn(8, 0),
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=0.5, temperature=4.0),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
        runtime=Runtime(nonfinite_check_every=every, **runtime),
        teacher_cache=TeacherOutputCache("memory", dtype="float32") if cache else None,
    )


def fitnet() -> DistillationModule:
    loss = DistillationLoss({"fitnet": FitNets(student_layer="features.3", teacher_layer="features.3")}, alpha=0.5)
    runtime = Runtime(nonfinite_check_every=EVERY)
    return DistillationModule(
        student=cnn(4, 1), teacher=cnn(8, 0), loss=loss, optimizer=partial(torch.optim.Adam, lr=1e-3),
        num_classes=10, runtime=runtime,
    )  # fmt: skip


def dkd() -> DistillationModule:
    loss = DistillationLoss({"dkd": DKD()}, alpha=0.5, temperature=4.0)
    return DistillationModule(
        student=MLP(hidden=16), teacher=cnn(8, 0), loss=loss, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        num_classes=10, runtime=Runtime(nonfinite_check_every=EVERY),
    )  # fmt: skip


def multi_teacher() -> MultiTeacherDistillation:
    return MultiTeacherDistillation(
        student=MLP(hidden=16), teachers={"teacher_0": cnn(8, 0), "teacher_1": cnn(4, 2)},
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=0.5, temperature=4.0),
        optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=10, combine="confidence",
        runtime=Runtime(nonfinite_check_every=EVERY),
    )  # fmt: skip


def trainer(steps: int, **options: Any) -> L.Trainer:
    return tiny_trainer(**{"max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, **options})


def assert_no_reads_but_the_checks(reads: HostReads, steps: int, first: set[str] = frozenset()) -> None:
    """No host read in any step but the N-th steps' checks (and, in the first step, one-time checks by the
    files ``first``)."""
    assert len(reads.steps) == steps
    assert reads.readers[0] <= first
    assert reads.steps[1:] == [0] * (steps - 1) and (reads.steps[0] == 0 or first)
    checked = [i for i, count in enumerate(reads.checks) if count]
    assert checked == [i for i in range(steps) if (i + 1) % EVERY == 0]  # only the N-th step's check reads


METHODS = {"kd": kd, "fitnet": fitnet, "dkd": dkd, "multi_teacher": multi_teacher}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_training_step_reads_no_device_value_between_checks(
    name: str, data: MNIST1DDataModule, host_reads: Callable[[Method], HostReads]
) -> None:
    module = METHODS[name]()
    reads = host_reads(module)
    trainer(9).fit(module, datamodule=data)
    assert_no_reads_but_the_checks(reads, 9)
    assert not any(reads.once) and not reads.foreign


def test_an_lm_training_step_reads_no_device_value_between_checks(
    tmp_path: Path, host_reads: Callable[[Method], HostReads]
) -> None:
    module = make_module(nonfinite_check_every=EVERY)  # token_kd on tiny Llamas
    reads = host_reads(module)
    trainer(9, default_root_dir=str(tmp_path)).fit(module, TinyData(batch_size=1))  # 12 steps per epoch
    # The label ids are checked against the vocabulary on the first batch only, the heads likewise.
    assert_no_reads_but_the_checks(reads, 9, first={"llm/token_loss.py"})
    assert reads.once[0] > 0 and not any(reads.once[1:])
    # Not ours: transformers' SDPA mask skips the causal mask when nothing is padded (padding_mask.all()).
    assert reads.foreign <= {"transformers/masking_utils.py"}
    assert torch.isfinite(trainer_metric(module, "train/loss"))


def trainer_metric(module: Method, name: str) -> torch.Tensor:
    return module.trainer.callback_metrics[name]


def poison_teacher_at(module: DistillationModule, step: int) -> None:
    """The live teacher's logits are NaN in training step ``step`` only."""
    teacher = module.teachers["teacher"]
    outputs = teacher.outputs

    def poisoned(x: Any) -> dict[str, torch.Tensor]:
        out = outputs(x)
        if module.training and module.global_step == step:
            out["logits"] = out["logits"] * float("nan")
        return out

    teacher.outputs = poisoned  # type: ignore[method-assign]


def test_a_nan_at_step_k_stops_at_the_next_check_naming_step_k_and_its_parts(data: MNIST1DDataModule) -> None:
    module = kd(every=5, cache=False)
    poison_teacher_at(module, 2)
    with pytest.raises(TrainingDiverged) as error:
        trainer(20).fit(module, datamodule=data)
    assert module.global_step == 4  # raised by the check of the fifth step (steps 0-4), before its update
    # The first non-finite step's own parts and outputs: the teacher's NaN, not the NaN student it left behind.
    assert str(error.value).startswith(
        "the training loss is non-finite at epoch 0, step 2 (non-finite loss parts: ['kd']; "
        "non-finite outputs of: ['teacher']; the first of 3 non-finite step(s) found by the check every 5 steps "
        "(runtime.nonfinite_check_every)): lower optimizer.lr"
    )


def test_a_nan_between_checks_is_found_before_validation_and_checkpoints(
    data: MNIST1DDataModule, tmp_path: Path
) -> None:
    module = kd(every=100, cache=False)
    poison_teacher_at(module, 1)
    options = {"limit_train_batches": 3, "limit_val_batches": 2, "max_epochs": 1, "enable_checkpointing": True}
    fit = trainer(-1, default_root_dir=tmp_path, **options)
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch 0, step 1 \(non-finite loss parts: \['kd'\]"):
        fit.fit(module, datamodule=data)
    assert not list(tmp_path.rglob("*.ckpt"))  # the epoch's checkpoint was never written


def test_a_nan_in_the_last_steps_stops_the_run_at_its_end(data: MNIST1DDataModule) -> None:
    module = kd(every=100, cache=False)
    poison_teacher_at(module, 3)
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch 0, step 3 \(non-finite loss parts: \['kd'\]"):
        trainer(4).fit(module, datamodule=data)


def test_an_lm_step_failing_on_values_a_non_finite_step_left_reports_that_step(tmp_path: Path) -> None:
    """E.g. on-policy sampling from NaN probabilities after an unchecked NaN step raises in torch: the run
    reports the non-finite step instead (with the failure as its context)."""
    module = make_module(nonfinite_check_every=5)
    loss_on, training_batch = module.loss_on, module.training_batch

    def poisoned(batch: Any, monitor_kl: bool = False) -> Any:
        out = loss_on(batch, monitor_kl)
        return out._replace(total=out.total * float("nan")) if module.global_step == 1 else out

    def failing(batch: Any, batch_idx: int) -> Any:
        if module.global_step == 3:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return training_batch(batch, batch_idx)

    module.loss_on, module.training_batch = poisoned, failing  # type: ignore[method-assign]
    with pytest.raises(
        TrainingDiverged, match=r"non-finite at epoch 0, step 1 \(.*llm\.nonfinite_check_every"
    ) as error:
        trainer(9, default_root_dir=str(tmp_path)).fit(module, TinyData(batch_size=1))
    assert isinstance(error.value.__context__, RuntimeError)


def test_every_process_stops_when_one_process_saw_a_non_finite_step() -> None:
    """The check's one reduction (max of the count, min of the first step): a process whose own steps were
    finite stops too, naming where the other one diverged."""
    elsewhere = torch.tensor([2, -1, -7])  # another process: 2 non-finite steps, the first at epoch 1, step 7

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        assert op == "max"
        return torch.maximum(tensor, elsewhere)

    guard = NonFiniteGuard("error", 3, "advice")
    one = torch.tensor(1.0)
    guard.step(one, {"ce": one}, {"student": {"logits": torch.zeros(2, 3)}}, 1, 8, reduce)
    guard.step(one, {"ce": one}, {"student": {"logits": torch.zeros(2, 3)}}, 1, 9, reduce)
    with pytest.raises(TrainingDiverged, match=r"^the training loss is non-finite at epoch 1, step 7 \(on another "):
        guard.step(one, {"ce": one}, {"student": {"logits": torch.zeros(2, 3)}}, 1, 10, reduce)


def test_skip_decides_every_step_whatever_the_interval() -> None:
    guard = NonFiniteGuard("skip", 5)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    with pytest.warns(UserWarning, match=r"non-finite training loss at epoch 0, step 3 \(parts \['ce'\]\): step"):
        assert guard.step(nan, {"ce": nan}, {}, 0, 3) is False
    assert guard.step(one, {"ce": one}, {}, 0, 4) is True and guard.record.pending == 0


def test_auto_checks_every_step_on_the_cpu_and_every_100_on_accelerators() -> None:
    assert steps_between_checks("auto", torch.device("cpu")) == 1
    assert steps_between_checks("auto", torch.device("cuda", 0)) == ACCELERATOR_EVERY == 100
    assert steps_between_checks(7, torch.device("cuda", 0)) == 7
    guard = NonFiniteGuard("error", "auto")  # on the CPU: stops at the step itself, before its backward
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch 1, step 5 \(non-finite loss parts: the total; "):
        guard.step(torch.tensor(float("inf")), {}, {}, 1, 5)


@pytest.mark.parametrize("value", [0, -1, 2.5, "often", True, None])
def test_a_bad_check_interval_names_its_key(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^runtime\.nonfinite_check_every="):
        Runtime(nonfinite_check_every=value)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("llm_distill")
    cfg.llm.nonfinite_check_every = value
    with pytest.raises(ConfigError, match=r"^llm\.nonfinite_check_every="):
        check_values(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(METHODS))
def test_a_training_step_never_synchronises_with_the_gpu(name: str, data: MNIST1DDataModule) -> None:
    """CUDA's sync debug mode turns every host synchronisation inside a training step (outside the N-th step's
    check) into an error."""
    module = METHODS[name]()
    step, check = module.training_step, module.nonfinite_guard.check

    def strict_step(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def allowed_check(*args: Any, **kwargs: Any) -> None:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            check(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    module.training_step = strict_step  # type: ignore[method-assign]
    module.nonfinite_guard.check = allowed_check  # type: ignore[method-assign]
    trainer(9, accelerator="gpu", devices=1).fit(module, datamodule=data)
    assert module.global_step == 9
