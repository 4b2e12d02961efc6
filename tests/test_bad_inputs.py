"""Bad input to ``kd-distill``, ``kd-train`` and ``kd-report``, one table of real subprocesses.

Every case must: exit non-zero; stop before any training step (no checkpoints, metrics, teacher or
scratch fit in its run directory, no epoch progress or ``Trainer.fit`` message); print exactly one line
``<program>: error: ...`` on stderr, naming the config key or phrase of the case; print no traceback;
and leave nothing a later run would trip on (no ``summary.json``, no ``checkpoints/``), nor an empty run folder
(kd-distill / kd-train: the run directory Hydra made holds only its ``.hydra`` files and the log, and is removed).

Cases whose run directory exists by construction (a finished run given again, the run folder kd-report
reads) must leave it as it was: the same ``summary.json``, ``checkpoints/``, ``csv/``, ``teacher/``,
``scratch/`` files and no report written.

The cases run concurrently, two at a time, from one module-scoped fixture; each parametrized test
asserts on its case's precomputed result.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.test_cli import REPO, run
from tests.warm_process import run_console_script

#: Seconds one case may take (a case that got through its check trains a few tiny epochs at most).
CASE_TIMEOUT = 240
#: What a training step leaves in a run directory.
FIT_OUTPUTS = ("checkpoints", "csv", "teacher", "scratch")
#: What a later run (or kd-report) would read back.
RESULT_FILES = ("summary.json", "report.md", "reliability.png")
#: Signs on the console that training ran.
TRAINING_SIGNS = ("Epoch ", "`Trainer.fit` stopped")


@dataclass(frozen=True)
class Paths:
    """Where a case runs: its own directory, and the finished run the module fixture made."""

    case: Path
    finished: Path

    @property
    def checkpoint(self) -> Path:
        return self.finished / "checkpoints" / "last.ckpt"


@dataclass(frozen=True)
class Case:
    """One bad input: ``program`` with ``args`` (``{case}``, ``{finished}``, ``{checkpoint}`` are filled in)
    must fail with one error line containing ``expect``.

    ``tiny``: prepend the TINY budget (kd-distill; keys the case sets are left out of it). ``run_dir``:
    the run directory (``hydra.run.dir``, appended for kd-distill / kd-train; kd-report's RUN_DIR is in
    ``args``). ``existing``: the run directory exists before the case (it must be left unchanged).
    ``setup``: prepares files under the case directory. ``env``: extra environment. ``check``: an extra
    criterion (returns a failure message or None). ``hydra_error``: Hydra's own composition error (no
    ``<program>: error:`` line) is accepted when it names ``expect``.
    """

    id: str
    program: str
    args: tuple[str, ...]
    expect: str
    tiny: bool = True
    run_dir: str = "{case}/run"
    existing: bool = False
    setup: Callable[[Paths], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Paths], str | None] | None = None
    hydra_error: bool = False


@dataclass
class Result:
    case: Case
    paths: Paths
    run_dir: Path
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    before: dict[str, str]
    after: dict[str, str]


# ------------------------------------------------------------------------------------------ setups
def write_random_safetensors(paths: Paths) -> None:
    (paths.case / "teacher.safetensors").write_bytes(os.urandom(4096))


def write_txt_checkpoint(paths: Paths) -> None:
    (paths.case / "teacher.txt").write_text("not a checkpoint\n")


def write_home_file(paths: Paths) -> None:
    (paths.case / "home_file").write_text("KD_LIGHTNING_HOME is this regular file\n")


def make_empty_run_dir(paths: Paths) -> None:
    (paths.case / "report_run").mkdir()


def copy_finished(paths: Paths) -> Path:
    """A copy of the finished run (summary and checkpoints) that a kd-report case may damage."""
    copy = paths.case / "report_run"
    shutil.copytree(paths.finished, copy, ignore=shutil.ignore_patterns(".hydra", "*.log", "teacher"))
    return copy


def truncated_summary(paths: Paths) -> None:
    summary = copy_finished(paths) / "summary.json"
    text = summary.read_text()
    summary.write_text(text[: len(text) // 2])


def summary_without_checkpoint(paths: Paths) -> None:
    shutil.rmtree(copy_finished(paths) / "checkpoints")


def malicious_summary(paths: Paths) -> None:
    """The stored student config edited to run a shell command if kd-report instantiated it."""
    summary_path = copy_finished(paths) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["config"]["student"]["model"] = {"_target_": "os.system", "_args_": [f"touch {paths.case / 'pwned'}"]}
    summary_path.write_text(json.dumps(summary))


def write_text_data(paths: Paths) -> None:
    """A CSV of sentences and two tokenizers (the student's, the teacher's), as a text-classification user has."""
    from tests.text_fixtures import SENTENCES, bpe_tokenizer, rows, word_tokenizer, write_csv

    write_csv(paths.case / "train.csv", rows([int(len(s.split()) > 3) for s in SENTENCES]))
    word_tokenizer(paths.case / "student_tok")
    bpe_tokenizer(paths.case / "teacher_tok")


def copy_for_report(paths: Paths) -> None:
    copy_finished(paths)


def not_pwned(paths: Paths) -> str | None:
    pwned = paths.case / "pwned"
    return f"{pwned} exists: the stored os.system target was executed" if pwned.exists() else None


# ------------------------------------------------------------------------------------------- cases
NARROW = ("student=cnn1d_narrow",)
#: The overrides of the finished run (with TINY): resuming it with them reuses its cached teacher.
FINISHED_RUN = ("trainer.max_epochs=1", "compare_scratch=false", "logger=none")
FRESH_CACHE = "paths.cache_dir={case}/empty_cache"
KD_TRAIN = ("teacher.fit.max_epochs=1", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false")


def distill(case_id: str, expect: str, *args: str, **kwargs) -> Case:
    return Case(case_id, "kd-distill", args, expect, **kwargs)


def train(case_id: str, expect: str, *args: str, **kwargs) -> Case:
    return Case(case_id, "kd-train", args, expect, tiny=False, **kwargs)


def report(case_id: str, expect: str, *args: str, existing: bool = True, **kwargs) -> Case:
    return Case(
        case_id, "kd-report", args, expect, tiny=False, run_dir="{case}/report_run", existing=existing, **kwargs
    )


CASES = [
    # loss
    distill("alpha-negative", "loss.alpha", "loss.alpha=-0.5"),
    distill("alpha-bool", "loss.alpha", "loss.alpha=true"),
    distill("alpha-string", "loss.alpha", "loss.alpha=abc"),
    # method=kd that distils nothing is supervised training: one line pointing at method=supervised
    distill(
        "kd-alpha-zero",
        "loss.alpha=0 distils nothing (cross-entropy only), so the teacher would never be used; "
        "train the student alone with method=supervised",
        "loss.alpha=0",
    ),
    distill("kd-alpha-weights-zero", "loss.weights={'kd': 0.0} distils nothing", "+loss.weights.kd=0"),
    distill("temperature-zero", "loss.temperature", "loss.temperature=0"),
    distill("temperature-nan", "loss.temperature", "loss.temperature=nan"),
    distill("label-smoothing-one", "loss.label_smoothing", "loss.label_smoothing=1.0"),
    distill("weights-unknown-term", "loss.weights", "+loss.weights.nope=1.0"),
    distill("term-field-typo", "tempreature", "+loss.terms.kd.tempreature=2"),
    distill(
        "fitnet-teacher-layer-missing",
        "features.99",
        "loss=fitnet",
        *NARROW,
        "loss.terms.fitnet.teacher_layer=features.99",
        FRESH_CACHE,
    ),
    # no "+": the logit terms' configs expose `student` / `teacher` reads (null: the logits)
    distill("term-reads-unknown-model", "teacher_9", "loss.terms.kd.teacher={model: teacher_9}"),
    # trainer
    distill("max-epochs-minus-one", "trainer.max_epochs", "trainer.max_epochs=-1"),
    distill("max-epochs-zero", "trainer.max_epochs", "trainer.max_epochs=0"),
    distill("max-epochs-float", "trainer.max_epochs", "trainer.max_epochs=2.5"),
    distill("devices-beyond-cores", "trainer.devices", "trainer.devices=99", "trainer.accelerator=cpu"),
    distill("accumulate-zero", "trainer.accumulate_grad_batches", "+trainer.accumulate_grad_batches=0"),
    distill("limit-train-batches-zero", "trainer.limit_train_batches", "+trainer.limit_train_batches=0"),
    distill("ckpt-path-number", "ckpt_path", "ckpt_path=123"),
    distill("devices-string-beyond-cores", "trainer.devices", "trainer.devices='99'", "trainer.accelerator=cpu"),
    distill("optimized-metric-unknown", "val/nope", "optimized_metric=val/nope"),
    distill("checkpoint-monitor-unknown", "val/nope", "callbacks.model_checkpoint.monitor=val/nope"),
    # optimizer / scheduler
    distill("lr-negative", "optimizer.lr", "optimizer.lr=-1"),
    distill("lr-nan", "optimizer.lr", "optimizer.lr=nan"),
    distill("cosine-t-max-zero", "scheduler.T_max", "scheduler=cosine", "scheduler.T_max=0"),
    # data
    distill("num-workers-negative", "data.num_workers", "data.num_workers=-1"),
    distill("batch-size-zero", "data.batch_size", "data.batch_size=0"),
    distill("num-classes-seven", "data.num_classes", "data.num_classes=7"),
    distill("return-index-maybe", "data.return_index", "data.return_index=maybe"),
    # top-level options
    distill("seed-float", "seed=1.5", "seed=1.5"),
    distill("compare-scratch-perhaps", "compare_scratch", "compare_scratch=perhaps"),
    # runtime
    distill("teacher-precision-int8", "runtime.teacher_precision", "runtime.teacher_precision=int8"),
    distill("compile-everything", "runtime.compile", "runtime.compile=everything"),
    distill("cpu-threads-zero", "runtime.cpu_threads", "runtime.cpu_threads=0"),
    distill("channels-last-maybe", "runtime.channels_last", "runtime.channels_last=maybe"),
    distill("nonfinite-ignore", "runtime.nonfinite", "runtime.nonfinite=ignore"),
    distill("nonfinite-check-every-zero", "runtime.nonfinite_check_every", "runtime.nonfinite_check_every=0"),
    # teacher cache
    distill("teacher-cache-feature-loss", "teacher_cache", "teacher_cache=disk", "loss=at", *NARROW),
    distill("teacher-cache-top-k-zero", "teacher_cache.top_k", "teacher_cache=memory", "teacher_cache.top_k=0"),
    # teacher weights
    distill("teacher-checkpoint-missing", "teacher.checkpoint", "teacher.checkpoint=/does/not/exist.ckpt"),
    distill(
        "teacher-checkpoint-txt",
        "teacher.checkpoint",
        "teacher.checkpoint={case}/teacher.txt",
        setup=write_txt_checkpoint,
    ),
    distill(
        "teacher-checkpoint-corrupt-safetensors",
        "teacher.checkpoint",
        "teacher.checkpoint={case}/teacher.safetensors",
        setup=write_random_safetensors,
    ),
    # resuming and run directories
    distill("ckpt-path-last-without-checkpoint", "ckpt_path=last", "ckpt_path=last"),
    distill("ckpt-path-other-student", "ckpt_path", *FINISHED_RUN, "ckpt_path={checkpoint}"),
    distill("run-dir-of-finished-run", "already holds a run", run_dir="{finished}", existing=True),
    # method, student, home
    distill("method-target-not-a-method", "method._target_", "method._target_=torch.nn.Linear"),
    distill("method-group-unknown", "method/does_not_exist", "method=does_not_exist", hydra_error=True),
    # method options, checked before any teacher is trained
    distill(
        "optimizer-per-peer-maybe", "method.optimizer_per_peer", "method=mutual", "method.optimizer_per_peer=maybe"
    ),
    distill("method-option-typo", "method.optimizer_per_pear", "method=mutual", "+method.optimizer_per_pear=true"),
    distill(
        "weights-ignored-by-mean",
        "is ignored by method.combine=mean",
        "method=multi_teacher",
        "method.weights={teacher_0: 1, teacher_1: 2}",
    ),
    distill(
        "weights-nan",
        "method.weights.teacher_0=nan",
        "method=multi_teacher",
        "method.combine=weights",
        "method.weights={teacher_0: nan, teacher_1: 1}",
    ),
    distill(
        "weights-negative",
        "method.weights.teacher_1=-1",
        "method=multi_teacher",
        "method.combine=weights",
        "method.weights={teacher_0: 1, teacher_1: -1}",
    ),
    distill(
        "weights-one-of-two",
        "method.weights={'teacher_0': 1} must give every teacher",
        "method=multi_teacher",
        "method.combine=weights",
        "method.weights={teacher_0: 1}",
    ),
    distill("data-free-batch-size-bool", "method.batch_size", "method=data_free", "method.batch_size=true"),
    distill(
        "teacher-tokenizer-without-teacher-input",
        "but teacher.input is null",
        "data=text",
        "data.train_file={case}/train.csv",
        "data.tokenizer={case}/student_tok",
        "data.teacher_tokenizer={case}/teacher_tok",
        "teacher=hf_text",
        "student=hf_text",
        setup=write_text_data,
    ),
    # pretrained weights would be downloaded: refused before timm / torchvision are imported, naming the local file
    distill("timm-pretrained", "teacher.model.pretrained=True", "teacher=timm", "+teacher.model.pretrained=true"),
    distill(
        "torchvision-weights-name",
        "student.model.weights=DEFAULT",
        "student=torchvision",
        "student.model.weights=DEFAULT",
    ),
    distill("student-num-classes-three", "student.model", "student.model.num_classes=3"),
    distill(
        "student-input-does-not-fit-data",
        "cannot read the data's batches",
        "data=digits",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        tiny=False,  # TINY sets data.transfer_samples, which digits has not
    ),
    # the CIFAR-zoo networks with an ImageNet namesake are cifar_<name> (old names: one line naming the new)
    distill("old-cifar-zoo-name", "student=cifar_mobilenetv2", "student=mobilenetv2"),
    distill(
        "home-is-a-file",
        "paths.home",
        setup=write_home_file,
        env={"KD_LIGHTNING_HOME": "{case}/home_file"},
    ),
    # kd-train
    train("train-fit-max-epochs-zero", "teacher.fit.max_epochs", *KD_TRAIN[1:], "teacher.fit.max_epochs=0"),
    train("train-fit-lr-negative", "teacher.fit.optimizer.lr", *KD_TRAIN, "teacher.fit.optimizer.lr=-1"),
    train("train-teacher-num-classes", "teacher.model", *KD_TRAIN, "teacher.model.num_classes=3"),
    train("train-devices-beyond-cores", "trainer.devices", *KD_TRAIN, "trainer.devices=99"),
    train("train-seed-string", "seed", *KD_TRAIN, "seed=abc"),
    train(
        "train-teacher-tokenizer-without-teacher-input",
        "but teacher.input is null",
        *KD_TRAIN,
        "data=text",
        "data.train_file={case}/train.csv",
        "data.tokenizer={case}/student_tok",
        "data.teacher_tokenizer={case}/teacher_tok",
        "teacher=hf_text",
        setup=write_text_data,
    ),
    train("train-old-cifar-zoo-name", "teacher=cifar_vgg13", *KD_TRAIN, "teacher=vgg13"),
    # kd-report
    report("report-no-summary", "summary.json", "{case}/report_run", existing=False, setup=make_empty_run_dir),
    report("report-not-a-directory", "not a directory", "{case}/report_run", existing=False),
    report("report-truncated-summary", "summary.json", "{case}/report_run", setup=truncated_summary),
    report("report-no-checkpoint", "checkpoint", "{case}/report_run", setup=summary_without_checkpoint),
    report(
        "report-os-system-target",
        "os.system",
        "{case}/report_run",
        setup=malicious_summary,
        check=not_pwned,
    ),
    report("report-repeats-zero", "--repeats", "{case}/report_run", "--repeats", "0", setup=copy_for_report),
]
assert len(CASES) >= 45 and len({case.id for case in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------ running
def fill(text: str, paths: Paths) -> str:
    for name, value in (("case", paths.case), ("finished", paths.finished), ("checkpoint", paths.checkpoint)):
        text = text.replace(f"{{{name}}}", str(value))
    return text


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def argv(case: Case, paths: Paths) -> list[str]:
    args = [fill(arg, paths) for arg in case.args]
    if case.program == "kd-report":
        return args
    tiny = tiny_without(args) if case.tiny else []
    return [*tiny, *args, f"hydra.run.dir={fill(case.run_dir, paths)}"]


def tiny_without(overrides: tuple[str, ...] | list[str]) -> list[str]:
    """The TINY budget less the keys ``overrides`` set."""
    keys = {override_key(override) for override in overrides}
    return [override for override in TINY if override_key(override) not in keys]


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file a fit or a finished run leaves (and of the results a later run reads back)."""
    files = [run_dir / name for name in RESULT_FILES]
    for name in FIT_OUTPUTS:
        files += sorted((run_dir / name).rglob("*")) if (run_dir / name).is_dir() else [run_dir / name]
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in files
        if path.exists()
    }


def launch(case: Case, paths: Paths, home: Path) -> Result:
    run_dir = Path(fill(case.run_dir, paths))
    before = snapshot(run_dir)
    start = time.perf_counter()
    try:
        if case.env:  # like tests.test_cli.run, with the case's environment
            env = {
                **os.environ,
                "KD_LIGHTNING_HOME": str(home),
                "PYTHONWARNINGS": "ignore",
                "PYTHONPATH": str(REPO),
                **{name: fill(value, paths) for name, value in case.env.items()},
            }
            result = run_console_script(case.program, argv(case, paths), env, paths.case, CASE_TIMEOUT)
        else:
            result = run(case.program, *argv(case, paths), home=home, timeout=CASE_TIMEOUT)
        returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as error:

        def text(out: str | bytes | None) -> str:
            return out.decode(errors="replace") if isinstance(out, bytes) else out or ""

        returncode, stdout, stderr = None, text(error.stdout), text(error.stderr)
        stderr += f"\n[killed after {CASE_TIMEOUT} s]"
    seconds = time.perf_counter() - start
    return Result(case, paths, run_dir, returncode, stdout, stderr, seconds, before, snapshot(run_dir))


@pytest.fixture(scope="module")
def results(kd_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Every case's result; first one finished run (a cnn1d_narrow student, which also caches the teacher)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    finished = base / "finished_narrow_run"
    start = time.perf_counter()
    finished_args = [*tiny_without(FINISHED_RUN), *NARROW, *FINISHED_RUN, f"hydra.run.dir={finished}"]
    made = run("kd-distill", *finished_args, home=kd_home)
    assert made.returncode == 0, made.stderr[-3000:]
    print(f"\nthe finished run (and its teacher) in {time.perf_counter() - start:.1f} s")
    assert (finished / "checkpoints" / "last.ckpt").is_file() and (finished / "summary.json").is_file()

    prepared = []
    for case in CASES:
        paths = Paths(base / case.id, finished)
        paths.case.mkdir()
        if case.setup is not None:
            case.setup(paths)
        prepared.append((case, paths))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.id: pool.submit(launch, case, paths, kd_home) for case, paths in prepared}
        done = {case_id: future.result() for case_id, future in futures.items()}
    print(f"\n{len(CASES)} bad-input cases in {time.perf_counter() - start:.1f} s (2 at a time)")
    for case_id, result in sorted(done.items(), key=lambda item: -item[1].seconds):
        print(f"  {result.seconds:6.1f} s  exit {result.returncode}  {case_id}")
    return done


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_fast_with_one_line(case: Case, results: dict[str, Result]) -> None:
    result = results[case.id]
    run_dir, out, err = result.run_dir, result.stdout, result.stderr
    failures = []
    # 1. a non-zero exit code
    if result.returncode is None or result.returncode == 0:
        failures.append(f"1 exit code: {result.returncode}")
    # 2. no training step ran
    if case.existing:
        changed = sorted(
            name
            for name in set(result.before) | set(result.after)
            if name.split("/")[0] in FIT_OUTPUTS and result.before.get(name) != result.after.get(name)
        )
        if changed:
            failures.append(f"2 fit outputs of the existing run dir changed: {changed[:5]}")
    else:
        made = [name for name in FIT_OUTPUTS if (run_dir / name).exists()]
        if made:
            failures.append(f"2 fit outputs written: {made}")
    signs = [sign for sign in TRAINING_SIGNS if sign in out or sign in err]
    if signs:
        failures.append(f"2 training progress printed: {signs}")
    # 3. exactly one error line, naming the key
    prefix = f"{case.program}: error:"
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    if case.hydra_error and not lines:
        if case.expect not in err:
            failures.append(f"3 Hydra's error does not name {case.expect!r}")
    elif len(lines) != 1:
        failures.append(f"3 {len(lines)} lines start with {prefix!r}")
    elif case.expect not in lines[0]:
        failures.append(f"3 the error line does not contain {case.expect!r}: {lines[0]}")
    # 4. no stack trace
    if "Traceback" in out or "Traceback" in err:
        failures.append("4 a traceback was printed")
    # 5. nothing a later run would trip on
    if case.existing:
        changed = sorted(
            name for name in set(result.before) | set(result.after) if result.before.get(name) != result.after.get(name)
        )
        if changed:
            failures.append(f"5 results of the existing run dir changed or were added: {changed[:5]}")
    else:
        left = [name for name in ("summary.json", "checkpoints") if (run_dir / name).exists()]
        if left:
            failures.append(f"5 left behind: {left}")
        if case.program != "kd-report" and run_dir.exists():
            failures.append(f"5 the run folder was left behind: {sorted(p.name for p in run_dir.iterdir())}")
    if case.check is not None and (problem := case.check(result.paths)):
        failures.append(f"extra: {problem}")
    assert not failures, (
        f"{case.program} {' '.join(argv(case, result.paths))}\nexit {result.returncode} in {result.seconds:.1f} s; "
        f"failed: {failures}\n--- stderr tail ---\n{err[-2500:]}\n--- stdout tail ---\n{out[-1000:]}"
    )
