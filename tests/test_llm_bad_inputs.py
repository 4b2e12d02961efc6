"""Bad input to ``kd-llm-distill`` and ``kd-llm-generate``, one table of real subprocesses (the LM twin of
test_bad_inputs.py).

Every case must: exit 2; print exactly one line ``<program>: error: ...`` naming the case's key; print no
traceback; train nothing (no ``checkpoints/``, ``summary.json`` or ``csv/`` in its run directory) and leave no
run folder behind (the one Hydra made holds only its ``.hydra`` files and the log, and is removed); and leave
every input file byte-identical.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_cli import run

TINY_GENERATE = (
    "llm/teacher=tiny",
    "prompts.kind=arithmetic",
    "prompts.num_prompts=4",
    "generate.out_file={case}/out.jsonl",
)
TINY_LM = (
    "llm/teacher=tiny",
    "llm/student=tiny",
    "trainer.max_steps=2",
    "+trainer.enable_progress_bar=false",
    "llm.data.train_prompts.num_prompts=8",
    "llm.data.val_prompts.num_prompts=4",
)
GOOD_ROW = '{"prompt": "What is 2 plus 3?", "completion": "The answer is 5."}\n'


@dataclass(frozen=True)
class Case:
    """``args`` (``{case}`` is the case's directory) must fail with one line containing ``expect``; ``files``:
    inputs written first (name -> bytes), which must be unchanged afterwards."""

    id: str
    expect: str
    args: tuple[str, ...]
    files: dict[str, bytes] | None = None
    program: str = "kd-llm-distill"


def case(case_id: str, expect: str, *args: str, **kwargs) -> Case:
    return Case(case_id, expect, args, **kwargs)


def file_case(case_id: str, expect: str, content: bytes) -> Case:
    """The training file ``train.jsonl`` holds ``content``."""
    args = ("llm/data=teacher_text", "llm.data.train_file={case}/train.jsonl", "llm.data.val_file={case}/val.jsonl")
    return Case(case_id, expect, args, {"train.jsonl": content, "val.jsonl": GOOD_ROW.encode()})


CASES = [
    # refused combinations of scheme, loss, cache and teachers
    case("on-policy-with-cache", "llm/teacher_cache", "llm/method=on_policy", "llm/teacher_cache=top_k"),
    case("distillm2-with-cache", "llm/teacher_cache", "llm/method=distillm2", "llm/teacher_cache=top_k"),
    case("sft-with-a-loss", "llm/loss=jsd", "llm/method=sft", "llm/loss=jsd"),
    case("alpha-zero-token-kd", "llm.loss.alpha", "llm.loss.alpha=0"),
    case("lmbda-zero-on-policy", "llm.method.lmbda", "llm/method=on_policy", "llm.method.lmbda=0"),
    # the sampled-token loss reads the student's own samples only, drawn exactly from the student
    case("sampled-loss-off-policy", "llm/method=token_kd", "llm/loss=reverse_kl_sampled", "llm/method=token_kd"),
    case(
        "sampled-loss-mixed-batches",
        "llm.method.lmbda=0.5",
        "llm/loss=reverse_kl_sampled",
        "llm/method=on_policy",
        "llm.method.lmbda=0.5",
    ),
    case(
        "sampled-loss-tempered-sampling",
        "llm.method.generation",
        "llm/loss=reverse_kl_sampled",
        "llm/method=on_policy",
        "llm.method.generation.temperature=0.7",
    ),
    case(
        "lmbda-above-one",
        "llm.method.lmbda",
        "llm/method=multi_teacher",
        "llm/teacher=routed_tiny",
        "llm.method.lmbda=2",
    ),
    case("generation-typo", "llm.method.generation", "llm/method=on_policy", "+llm.method.generation.max_tokens=4"),
    case("method-option-typo", "llm.method.lmbdaa", "llm/method=on_policy", "+llm.method.lmbdaa=0.5"),
    case("several-teachers-token-kd", "llm/method=multi_teacher", "llm/teacher=routed_tiny"),
    case("multi-teacher-one-teacher", "llm.teacher.teachers", "llm/method=multi_teacher"),
    case(
        "mixture-weights-nan",
        "llm.teacher.combine.weights",
        "llm/method=multi_teacher",
        "llm/teacher=mixture_tiny",
        "llm.teacher.combine.weights={small: nan, large: 1}",
    ),
    case("cache-top-k-zero", "llm.teacher_cache.top_k", "llm/teacher_cache=top_k", "llm.teacher_cache.top_k=0"),
    # old spellings
    case("old-mode", "llm/method=on_policy", "llm/mode=on_policy"),
    case("old-mode-key", "llm.method.lmbda", "llm.mode.lmbda=0.5"),
    case("old-sft-loss", "llm/method=sft", "llm/loss=sft"),
    # values (the classifier table's keys that exist in conf/llm_distill.yaml)
    case("alpha-bool", "llm.loss.alpha", "llm.loss.alpha=true"),
    case("alpha-negative", "llm.loss.alpha", "llm.loss.alpha=-0.5"),
    case("save-teacher-maybe", "save_teacher", "save_teacher=maybe"),
    case("seed-float", "seed", "seed=1.5"),
    case("nonfinite-ignore", "llm.nonfinite", "llm.nonfinite=ignore"),
    case("nonfinite-check-every-often", "llm.nonfinite_check_every", "llm.nonfinite_check_every=often"),
    case("max-epochs-forever", "trainer.max_epochs", "trainer.max_epochs=-1", "trainer.max_steps=-1"),
    case("devices-beyond-cores", "trainer.devices", "trainer.devices=99", "trainer.accelerator=cpu"),
    case("devices-list-beyond-cores", "trainer.devices", "trainer.devices=[0,1,2,3,4]", "trainer.accelerator=cpu"),
    case("lr-negative", "optimizer.lr", "optimizer.lr=-1"),
    case("lr-nan", "optimizer.lr", "optimizer.lr=nan"),
    case("optimized-metric-unknown", "val/nope", "optimized_metric=val/nope"),
    case("checkpoint-monitor-unknown", "val/nope", "callbacks.model_checkpoint.monitor=val/nope"),
    case("student-vocab-too-small", "llm.student", "llm.student.vocab_size=50"),
    case("pruned-keep-too-many", "llm.student.keep_layers", "llm/student=pruned", "llm.student.keep_layers=9"),
    case("pruned-heads-zero", "llm.student.heads_keep", "llm/student=pruned", "llm.student.heads_keep=0"),
    case("lr-absurd", "optimizer.lr", "optimizer.lr=1e30"),
    case("teacher-dtype-bf16", "llm.teacher.dtype", "llm.teacher.dtype=bf16"),
    case("teacher-dtype-list", "llm.teacher.dtype", "llm.teacher.dtype=[bfloat16]"),
    case("checkpointing-maybe", "llm.student.gradient_checkpointing", "llm.student.gradient_checkpointing=maybe"),
    case("packing-prompt-only", "llm.data.packing", "llm.data.packing=true", "llm.data.prompt_only=true"),
    case("pack-length-short", "llm.data.pack_length", "llm.data.packing=true", "llm.data.pack_length=8"),
    # input files are only ever read
    file_case("file-last-line-not-json", "llm.data.train_file", (GOOD_ROW * 3 + '{"prompt": "cut').encode()),
    file_case("file-whitespace-only", "llm.data.train_file", b"   \n\n  \n"),
    file_case("file-row-without-prompt", "llm.data.train_file", (GOOD_ROW + '{"completion": "x"}\n').encode()),
    file_case("file-not-utf8", "UTF-8", GOOD_ROW.encode() + b'{"prompt": "\xff\xfe"}\n'),
    file_case("file-not-objects", "JSON object", (GOOD_ROW + "[1, 2, 3]\n").encode()),
]
GENERATE_CASES = [
    Case("generate-do-sample-maybe", "generate.do_sample", ("generate.do_sample=maybe",), program="kd-llm-generate"),
    Case(
        "generate-tokens-float", "generate.max_new_tokens", ("generate.max_new_tokens=1.5",), program="kd-llm-generate"
    ),
    Case("generate-batch-size-zero", "generate.batch_size", ("generate.batch_size=0",), program="kd-llm-generate"),
    Case("generate-seed-float", "seed", ("seed=1.5",), program="kd-llm-generate"),
]
CASES += GENERATE_CASES
assert len({c.id for c in CASES}) == len(CASES)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    before: dict[str, str]
    after: dict[str, str]


def digests(folder: Path, names: Callable[[], list[str]]) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names()}


def launch(c: Case, folder: Path, home: Path) -> Result:
    folder.mkdir(parents=True)
    for name, content in (c.files or {}).items():
        (folder / name).write_bytes(content)
    names = lambda: sorted(c.files or {})  # noqa: E731
    before = digests(folder, names)
    run_dir = folder / "run"
    args = [arg.replace("{case}", str(folder)) for arg in c.args]
    keys = {arg.split("=", 1)[0].lstrip("+~") for arg in args}
    if "llm/data" in keys:  # a data file: no generated prompts to size
        keys |= {"llm.data.train_prompts.num_prompts", "llm.data.val_prompts.num_prompts"}
    budget = TINY_LM if c.program == "kd-llm-distill" else TINY_GENERATE
    tiny = [arg.replace("{case}", str(folder)) for arg in budget if arg.split("=", 1)[0].lstrip("+~") not in keys]
    result = run(c.program, *tiny, *args, f"hydra.run.dir={run_dir}", home=home, timeout=240)
    return Result(result.returncode, result.stdout, result.stderr, run_dir, before, digests(folder, names))


@pytest.fixture(scope="module")
def results(kd_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    base = tmp_path_factory.mktemp("llm_bad_inputs")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(launch, c, base / c.id, kd_home) for c in CASES}
        return {case_id: future.result() for case_id, future in futures.items()}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_llm_input_fails_fast_with_one_line(c: Case, results: dict[str, Result]) -> None:
    result = results[c.id]
    err = result.stderr
    lines = [line for line in err.splitlines() if line.startswith(f"{c.program}: error:")]
    failures = []
    if result.returncode != 2:
        failures.append(f"exit code {result.returncode}")
    if len(lines) != 1 or c.expect not in lines[0]:
        failures.append(f"error lines {lines} do not name {c.expect!r} once")
    if "Traceback" in err or "Traceback" in result.stdout:
        failures.append("a traceback was printed")
    outputs = [result.run_dir / name for name in ("checkpoints", "summary.json", "csv")]
    left = [path.name for path in [*outputs, result.run_dir.parent / "out.jsonl"] if path.exists()]
    if left:
        failures.append(f"trained: {left} in the run directory")
    if result.run_dir.exists():
        failures.append(f"the run folder was left behind: {sorted(p.name for p in result.run_dir.iterdir())}")
    if result.before != result.after:
        failures.append("an input file changed")
    assert not failures, f"{c.id}: {failures}\n--- stderr tail ---\n{err[-2500:]}"
