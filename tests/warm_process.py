"""Console-script runs for the tests without paying Python's start-up each time: a warm worker.

Most of a failing or tiny ``kd-distill`` process is importing torch, Lightning, Hydra and transformers (about
5 s of a 6 s bad-input case on 2 cores). ``python -m tests.warm_process`` imports them once and then forks one
process per run: the run gets its own process (its own memory, working directory, environment, standard
streams, exit status and process group), started from an interpreter that has already imported the library.

What a fork does not give a run, a fresh process gives: import-time output (warnings and notices printed while
importing go to the worker's stream, not the run's) and interpreter start-up settings (``PYTHON*`` variables,
thread counts read at import). :func:`run_console_script` starts a fresh process when the environment changes
such a setting, when ``fresh=True`` (tests of what a user sees at start-up, signals, distributed launches), or
when ``KD_TEST_FRESH_PROCESSES=1`` (every run a fresh process, to check the suite does not depend on the worker).

Protocol: one JSON request per line on the worker's stdin; per request the worker forks a waiter, which forks the
run and writes ``pid`` (the run's) and then ``rc`` (its exit status, ``-N`` for signal N) into the request's
directory; the caller polls for ``rc``, and on timeout kills the run's process group.
"""

from __future__ import annotations

import atexit
import configparser
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Variables read when an interpreter or a library starts: a run that changes one gets a fresh process.
STARTUP_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "NO_COLOR")
#: What the worker imports before forking: every console script and what their runs import.
PRELOAD = (
    "torch",
    "lightning",
    "hydra",
    "transformers",
    "kd_lightning.recipes.distill",
    "kd_lightning.recipes.teacher",
    "kd_lightning.recipes.llm_distill",
    "kd_lightning.recipes.report",
)


def entry_points() -> dict[str, str]:
    """Console script name -> ``module:function``, as setup.cfg declares them."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, target in (line.split("=", 1) for line in lines)}


# ------------------------------------------------------------------------------------------------ caller
class _Worker:
    """The warm worker of this test session (started on first use, stopped at exit)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def start(self, env: dict[str, str]) -> subprocess.Popen:
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.env = dict(env)
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "tests.warm_process"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    env=env,
                    cwd=REPO,
                )
                assert self.process.stdout is not None and self.process.stdout.readline() == "ready\n"
                atexit.register(self.stop)
            return self.process

    def submit(self, request: dict) -> None:
        with self.lock:
            assert self.process is not None and self.process.stdin is not None
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


WORKER = _Worker()


def needs_fresh_process(env: dict[str, str], base: dict[str, str]) -> bool:
    """Whether ``env`` changes a setting read at start-up relative to the worker's environment ``base``."""
    keys = {k for k in set(env) | set(base) if k.startswith("PYTHON") or k in STARTUP_VARIABLES}
    return any(env.get(k) != base.get(k) for k in keys)


def run_console_script(
    program: str, args: list[str], env: dict[str, str], cwd: Path, timeout: float, fresh: bool = False
) -> subprocess.CompletedProcess:
    """``subprocess.run([BIN / program, *args], capture_output=True, text=True, env=env, cwd=cwd,
    timeout=timeout)``, in a process forked from the warm worker unless a fresh one is needed (module doc)."""
    base = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    if fresh or os.environ.get("KD_TEST_FRESH_PROCESSES") == "1" or needs_fresh_process(env, base):
        command = [str(BIN / program), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    WORKER.start(base)
    if needs_fresh_process(env, WORKER.env):
        command = [str(BIN / program), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    with tempfile.TemporaryDirectory(prefix="warm_run_") as tmp:
        folder = Path(tmp)
        WORKER.submit({"program": program, "args": args, "env": env, "cwd": str(cwd), "dir": tmp})
        deadline = time.monotonic() + timeout
        while not (folder / "rc").exists():
            if time.monotonic() > deadline:
                _kill(folder)
                stdout, stderr = _outputs(folder)
                raise subprocess.TimeoutExpired([program, *args], timeout, output=stdout, stderr=stderr)
            time.sleep(0.02)
        stdout, stderr = _outputs(folder)
        return subprocess.CompletedProcess([program, *args], int((folder / "rc").read_text()), stdout, stderr)


def _outputs(folder: Path) -> tuple[str, str]:
    return tuple(
        (folder / name).read_text(errors="replace") if (folder / name).exists() else "" for name in ("out", "err")
    )


def _kill(folder: Path) -> None:
    """Kill the run's process group (its own processes and their workers); wait for the waiter's ``rc``."""
    for _ in range(250):
        if (folder / "pid").exists() and (folder / "pid").read_text():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int((folder / "pid").read_text()), signal.SIGKILL)
            break
        time.sleep(0.02)
    for _ in range(250):
        if (folder / "rc").exists():
            return
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ worker
def _run(request: dict) -> int:
    """In the forked run: the console script with the request's argv, environment, directory and streams."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    folder = Path(request["dir"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [str(BIN / request["program"]), *request["args"]]
    module, function = entry_points()[request["program"]].split(":")
    try:
        sys.exit(getattr(importlib.import_module(module), function)())
    except SystemExit as stop:  # as the interpreter turns sys.exit's argument into a status
        code = stop.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code
        else:
            print(code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    threading._shutdown()  # as at interpreter exit: wait for non-daemon threads, then the atexit handlers
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return status


def _wait_for_run(request: dict) -> None:
    """In the waiter: fork the run in its own process group, record its pid, wait, record its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    folder = Path(request["dir"])
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os._exit(_run(request))
    (folder / "pid").write_text(str(pid))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    (folder / "rc.tmp").write_text(str(code))
    os.replace(folder / "rc.tmp", folder / "rc")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported; every LM run sets it
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped as they end
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            try:
                _wait_for_run(request)
            finally:
                os._exit(0)


if __name__ == "__main__":
    main()
