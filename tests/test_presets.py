"""The conf/experiment and conf/debug presets: every file composes and builds; each experiment is exactly
what the script behind its published table runs; the debug presets reach the Trainer and run in seconds."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import DictConfig, OmegaConf

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.recipes.distill import distill
from tests.conftest import compose_config, example_for

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
PRESETS = [
    (group, path.stem)
    for group in ("experiment", "debug")
    for path in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))
]
#: What a script adds to its jobs' command lines only to keep their output quiet; presets leave it alone.
PRESENTATION = {"+trainer.enable_progress_bar=false"}
#: conf/experiment/mnist1d_kd is the README's default result (80 epochs); the methods table's kd row is this.
TABLE_KD_PRESET = "mnist1d_kd_40ep"


def table_preset(method: str) -> str:
    """The conf/experiment preset of the methods table's row ``method``."""
    return TABLE_KD_PRESET if method == "kd" else f"mnist1d_{method}"


@functools.cache
def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (scripts/ is not a package; its shared modules import from it)."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def published_command(doc: str) -> list[str]:
    """The words of the ``Command: `...``` line a script wrote into docs/results/<doc>."""
    return re.search(r"^Command: `([^`]*)`", (RESULTS / doc).read_text(), re.MULTILINE).group(1).split()


def after_dashes(words: list[str]) -> list[str]:
    """The Hydra overrides a published command passed through to every run (after ``--``)."""
    return words[words.index("--") + 1 :] if "--" in words else []


def job_overrides(monkeypatch: pytest.MonkeyPatch, script: ModuleType, launch: Callable[[], Any]) -> list[str]:
    """The overrides one of ``script``'s sweeps gives each job: its ``kd-distill -m`` command, captured instead
    of run, without the seed list and the sweep directory (what varies per job and where jobs go)."""
    commands: list[list[str]] = []
    # The module that starts the processes: the script itself, or the shared scripts/multirun.py it imports.
    runner = script if hasattr(script, "subprocess") else sys.modules["multirun"]
    stand_in = SimpleNamespace(**vars(runner.subprocess))  # the real module's constants, its own run()
    stand_in.run = lambda command, **_: commands.append(command)
    monkeypatch.setattr(runner, "subprocess", stand_in)
    launch()
    (command,) = commands
    assert Path(command[0]).name == "kd-distill" and command[1] == "-m", command
    return [word for word in command[2:] if not word.startswith(("seed=", "hydra.sweep.dir="))]


def differences(left: Any, right: Any, key: str = "") -> list[str]:
    """Dotted keys where two resolved configs differ (a readable assertion message)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return [d for k in sorted(set(left) | set(right)) for d in differences(left.get(k), right.get(k), f"{key}.{k}")]
    return [] if left == right else [f"{key.lstrip('.')}: {left!r} != {right!r}"]


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def assert_preset_is(tmp_path: Path, preset: str, script_overrides: list[str]) -> DictConfig:
    """The experiment ``preset`` composes to the very config the script's overrides compose to."""
    script_cfg = compose_config(tmp_path, script_overrides)
    quiet = [word for word in script_overrides if word in PRESENTATION]
    preset_cfg = compose_config(tmp_path, [f"experiment={preset}", *quiet])
    assert not differences(resolved(preset_cfg), resolved(script_cfg)), (
        f"conf/experiment/{preset}.yaml drifted from the script's {script_overrides}: "
        f"{differences(resolved(preset_cfg), resolved(script_cfg))}"
    )
    return preset_cfg


def parameters(node: DictConfig) -> int:
    return sum(p.numel() for p in instantiate(node).parameters())


@pytest.fixture(autouse=True)
def restore_determinism() -> Iterator[None]:
    """``Trainer(deterministic=True)`` (the debug presets) turns PyTorch's deterministic mode on for the
    whole process and sets CUBLAS_WORKSPACE_CONFIG: put both back so later tests run as they would alone."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def build_trainer(cfg: DictConfig) -> Any:
    return instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)


# (a) every preset file -----------------------------------------------------------------------------------


def needs_vision(group: str, name: str) -> bool:
    """Whether the preset builds timm / torchvision models (the vision extra, run with ``pytest -m vision``)."""
    text = (Path(CONFIG_DIR) / group / f"{name}.yaml").read_text()
    return bool(re.search(r"override /(teacher|student): (timm|torchvision)\b", text))


@pytest.mark.parametrize(
    ("group", "name"),
    [pytest.param(g, n, marks=pytest.mark.vision) if needs_vision(g, n) else (g, n) for g, n in PRESETS],
    ids=[f"{g}={n}" for g, n in PRESETS],
)
def test_every_preset_composes_and_builds(group: str, name: str, tmp_path: Path, kd_home: Path) -> None:
    lines = (Path(CONFIG_DIR) / group / f"{name}.yaml").read_text().splitlines()
    # Hydra reads the package header only above every other line: below a comment it is silently ignored.
    assert lines[0] == "# @package _global_", f"{group}/{name}.yaml must start with '# @package _global_'"
    assert lines[1].startswith("# ") and f"kd-distill {group}={name}" in "\n".join(lines[1:6])
    cfg = compose_config(tmp_path, [f"{group}={name}"])
    assert group not in cfg  # merged at the top level, not nested under the group's name
    # Config files may add keys, so a misspelt one only fails when built: build everything a run builds.
    instantiate(cfg.data)
    instantiate(cfg.loss)
    for node in (cfg.student, cfg.teacher):
        logits = instantiate(node.model)(example_for(node.model))
        assert logits.shape == (2, cfg.data.num_classes)
    for node in (cfg.callbacks or {}).values():
        instantiate(node)
    trainer = build_trainer(cfg)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    if group == "debug":
        assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices == 1
        assert torch.are_deterministic_algorithms_enabled()
        assert cfg.task_name == "debug" and not cfg.compare_scratch
        assert cfg.data.transfer_samples < compose_config(tmp_path, []).data.transfer_samples


# (b) experiments == the scripts behind the published tables ----------------------------------------------


@pytest.mark.parametrize("method", list(load_script("methods_table").METHODS))
def test_methods_table_row_preset_is_what_the_script_runs(
    method: str, tmp_path: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script("methods_table")
    words = published_command("methods.md")
    epochs = int(words[words.index("--epochs") + 1])
    overrides = job_overrides(
        monkeypatch, script, lambda: script.run_method(method, [0], epochs, tmp_path, after_dashes(words))
    )
    assert f"trainer.max_epochs={epochs}" in overrides and any(o.startswith("loss=") for o in overrides)
    cfg = assert_preset_is(tmp_path / "run", table_preset(method), overrides)

    rows = dict(re.findall(r"^\| (\w+) \| (\w+ \([\d,]+\)) \|", (RESULTS / "methods.md").read_text(), re.MULTILINE))
    if method in rows:  # the published row's student: same class, same size
        student = cfg.student.model._target_.rsplit(".", 1)[-1]
        assert f"{student} ({parameters(cfg.student.model):,})" == rows[method]


def test_every_methods_table_row_has_a_preset_and_no_preset_is_orphaned() -> None:
    methods = load_script("methods_table").METHODS
    presets = {name for group, name in PRESETS if group == "experiment" and name.startswith("mnist1d_")}
    schemes = load_script("schemes_table")  # docs/results/schemes.md runs its own presets on top of its BASE
    scheme_presets = {
        word.split("=", 1)[1]
        for overrides, _ in schemes.SCHEMES.values()
        for word in [*schemes.BASE, *overrides]
        if word.startswith("experiment=")
    }
    assert scheme_presets <= presets
    assert presets == {table_preset(m) for m in methods} | {"mnist1d_kd"} | scheme_presets


def test_published_methods_table_ran_the_scripts_current_overrides() -> None:
    """Else a preset equal to METHODS would no longer reproduce the published numbers."""
    methods = load_script("methods_table").METHODS
    words = published_command("methods.md")
    published = words[words.index("--methods") + 1 : words.index("--seeds")]
    assert set(published) <= set(methods)
    per_method = "; ".join(f"{m}: `{' '.join(methods[m])}`" for m in published if methods[m])
    assert f"Per-method overrides: {per_method}." in (RESULTS / "methods.md").read_text()


def test_default_result_preset_is_what_kd_vs_scratch_runs(
    tmp_path: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script("kd_vs_scratch")
    extra = after_dashes(published_command("default.md"))
    overrides = job_overrides(monkeypatch, script, lambda: script.sweep([0], extra, tmp_path / "kd"))
    cfg = assert_preset_is(tmp_path / "run", "mnist1d_kd", overrides)

    # ... and what docs/results/default.md (the README table) states about that run.
    text = (RESULTS / "default.md").read_text()
    kd = re.search(r"student distilled \(KD, T=(?P<T>[\d.]+), alpha=(?P<alpha>[\d.]+)\), (?P<epochs>\d+) epochs", text)
    assert cfg.loss.temperature == float(kd["T"]) and cfg.loss.alpha == float(kd["alpha"])
    assert cfg.trainer.max_epochs == int(kd["epochs"])
    transfer = re.search(r"\+ ([\d,]+) unlabelled transfer samples", text).group(1)
    assert cfg.data.transfer_samples == int(transfer.replace(",", "")) and cfg.compare_scratch
    teacher, student = re.search(
        r"\| teacher \(1-D CNN\) \| ([\d,]+) \|.*?\| student from scratch.*? \| ([\d,]+) \|", text, re.DOTALL
    ).groups()
    assert f"{parameters(cfg.teacher.model):,}" == teacher and f"{parameters(cfg.student.model):,}" == student


# (c) the debug runs, end to end ---------------------------------------------------------------------------


def assert_finite_metrics(summary: dict[str, Any]) -> dict[str, float]:
    metrics = summary["metrics"]
    assert {"train/loss", "train/loss_kd", "val/acc", "test/acc", "test/acc_last", "teacher/test_acc"} <= set(metrics)
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("val/acc", "test/acc", "teacher/test_acc"))
    assert summary["scratch"] is None  # compare_scratch=false
    return metrics


def test_debug_fast_dev_run_runs_end_to_end(tmp_path: Path, kd_home: Path) -> None:
    run = tmp_path / "run"
    summary = distill(compose_config(run, ["debug=fast_dev_run", "+trainer.enable_progress_bar=false"]))
    metrics = assert_finite_metrics(summary)
    # No best checkpoint under fast_dev_run: the student is tested once more with its final weights.
    assert summary["best_checkpoint"] == "" and metrics["test/acc"] == metrics["test/acc_last"]
    assert summary["config"]["trainer"]["fast_dev_run"] is True and (run / "summary.json").is_file()
    assert torch.are_deterministic_algorithms_enabled()  # trainer.deterministic reached the Trainer


def test_debug_limit_batches_runs_end_to_end(tmp_path: Path, kd_home: Path) -> None:
    run = tmp_path / "run"
    cfg = compose_config(run, ["debug=limit_batches", "+trainer.enable_progress_bar=false"])
    summary = distill(cfg)
    assert_finite_metrics(summary)
    assert Path(summary["best_checkpoint"]).is_file()
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == cfg.trainer.max_epochs * cfg.trainer.limit_train_batches
    assert last["epoch"] == cfg.trainer.max_epochs - 1


# (d) what each debug preset sets reaches the Trainer ------------------------------------------------------

TRAINER_SETTINGS: dict[str, dict[str, Any]] = {
    "fast_dev_run": {"fast_dev_run": True, "limit_train_batches": 1, "limit_val_batches": 1},
    "overfit_batches": {"overfit_batches": 3, "limit_train_batches": 3, "limit_val_batches": 3},
    "limit_batches": {"limit_train_batches": 3, "limit_val_batches": 2, "limit_test_batches": 2},
}


@pytest.mark.parametrize("name", sorted(TRAINER_SETTINGS))
def test_debug_preset_reaches_the_trainer(name: str, tmp_path: Path) -> None:
    trainer = build_trainer(compose_config(tmp_path, [f"debug={name}"]))
    assert {attr: getattr(trainer, attr) for attr in TRAINER_SETTINGS[name]} == TRAINER_SETTINGS[name]


def test_debug_overfit_batches_trains_several_epochs_teacher_included(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["debug=overfit_batches"])
    assert cfg.trainer.overfit_batches == 3 and cfg.trainer.max_epochs > 1
    assert cfg.teacher.fit.max_epochs == cfg.trainer.max_epochs


def test_debug_profiler_profiles_one_epoch(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["debug=profiler"])
    trainer = build_trainer(cfg)
    assert isinstance(trainer.profiler, SimpleProfiler) and trainer.max_epochs == 1
    assert not cfg.trainer.detect_anomaly  # it would dominate the timings


# (c) the CIFAR-100 protocol presets ------------------------------------------------------------------------


def test_every_cifar100_preset_is_in_the_protocol_script_and_runs_the_protocol(tmp_path: Path) -> None:
    script = load_script("cifar100_protocol")
    presets = {name for group, name in PRESETS if group == "experiment" and name.startswith("cifar100_")}
    assert presets == {f"cifar100_{method}" for method in script.PUBLISHED} | {"cifar100_protocol"}
    for method in script.PUBLISHED:
        cfg = compose_config(tmp_path, [f"experiment=cifar100_{method}"])
        pair = f"{cfg.teacher.model._target_.rsplit('.', 1)[-1]} -> {cfg.student.model._target_.rsplit('.', 1)[-1]}"
        assert pair == script.pair_of(method), method
        assert (cfg.trainer.max_epochs, cfg.teacher.fit.max_epochs, cfg.data.batch_size, cfg.data.val_samples) == (
            240,
            240,
            64,
            0,
        )
        # MLKD's authors train the student at lr 0.025 (configs/cifar100/ours/*.yaml); the shared teacher stays at 0.05.
        lr = 0.025 if method.startswith("mlkd") else 0.05
        assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (lr, 0.9, 0.0005)
        assert cfg.teacher.fit.optimizer.lr == 0.05
        assert list(cfg.scheduler.milestones) == [150, 180, 210] and dict(cfg.data.augment) == {
            "padding": 4,
            "flip": True,
        }


@pytest.mark.slow
def test_cifar100_protocol_script_tabulates_seeds_beside_the_published_numbers(tmp_path: Path) -> None:
    from tests.image_fixtures import write_cifar100

    write_cifar100(tmp_path / "data", train=128, test=64)
    out = tmp_path / "cifar100.md"
    command = [sys.executable, str(REPO / "scripts" / "cifar100_protocol.py"), "--data-root", str(tmp_path / "data")]
    command += ["--methods", "kd", "dkd_wrn", "--seeds", "0", "1", "--epochs", "1", "--root", str(tmp_path / "r")]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True, timeout=900)
    text = out.read_text()
    assert "Command: `python scripts/cifar100_protocol.py --data-root <dir> --methods kd dkd_wrn" in text
    assert re.search(
        r"^\| kd \| resnet32x4 -> resnet8x4 \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| 73\.33 \|", text, re.M
    )
    assert re.search(r"^\| dkd_wrn \| wrn_40_2 -> wrn_16_2 \| .* \| 76\.23 \| .* \| 2 \|$", text, re.M)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(CONFIG_DIR) / "debug").glob("*.yaml")))
def test_every_debug_preset_fits_every_data_option(preset: str, tmp_path: Path) -> None:
    """A preset sets only keys each datamodule's constructor takes (one on data=cifar10 set transfer_samples,
    which only MNIST-1D and text data have: 'unexpected keyword argument')."""
    import inspect

    from hydra.utils import get_class

    for data in sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml")):
        node = compose_config(tmp_path, [f"debug={preset}", f"data={data}"]).data
        keys = {key for key in node if not key.startswith("_")}
        parameters = inspect.signature(get_class(node._target_)).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            assert keys <= set(parameters), (preset, data, sorted(keys - set(parameters)))
