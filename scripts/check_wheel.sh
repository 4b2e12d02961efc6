#!/usr/bin/env bash
# Packaging check (CI runs it after the tests): build a real, non-editable wheel of the working tree,
# install it into a fresh venv (CPU torch first, then the wheel with its runtime deps from PyPI) and,
# from a directory outside the repository, check that the Hydra configs shipped inside the wheel work:
#   1. kd-distill --cfg job composes the config;
#   2. a user's own config dir adds a group option (--config-dir DIR and hydra.searchpath=[file://DIR]);
#   3. a 1-epoch kd-distill run on CPU exits 0 and writes summary.json under $KD_LIGHTNING_HOME/runs.
# Prints one PASS / FAIL line; exits non-zero on failure. Everything lives in one temp dir, removed on exit.
#   bash scripts/check_wheel.sh        # PYTHON=python3.12 bash scripts/check_wheel.sh for another interpreter
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3}
start=$SECONDS
tmp="$(mktemp -d "${TMPDIR:-/tmp}/kd_check_wheel.XXXXXX")"
# CHECK_WHEEL_KEEP=1 keeps the temp dir (logs, venv) for a look afterwards.
if [ -n "${CHECK_WHEEL_KEEP:-}" ]; then
  trap 'echo "check_wheel: kept $tmp"' EXIT
else
  trap 'rm -rf "$tmp"' EXIT
fi
mkdir -p "$tmp/src" "$tmp/dist" "$tmp/logs" "$tmp/home" "$tmp/work" "$tmp/userconf/student"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline KD_LIGHTNING_HOME="$tmp/home"
unset PYTHONPATH  # the source tree must not be importable: only the installed wheel counts

fail() {  # fail MESSAGE [LOG]: the tail of LOG (stdout) and LOG.err (stderr), then the FAIL line
  local f
  for f in "${2:-}" "${2:-}.err"; do
    if [ -s "$f" ]; then
      echo "--- tail of $f" >&2
      tail -n 30 "$f" >&2
    fi
  done
  echo "check_wheel: FAIL: $1 ($((SECONDS - start)) s)" >&2
  exit 1
}
# step NAME CMD...: run CMD, stdout to $tmp/logs/NAME.log, stderr to NAME.log.err; FAIL if it fails.
step() {
  local name=$1 log="$tmp/logs/$1.log" t0=$SECONDS
  shift
  "$@" >"$log" 2>"$log.err" || fail "$name (exit $?)" "$log"
  echo "check_wheel: $name ok ($((SECONDS - t0)) s)"
}

# The wheel is built from a copy of the working tree (tracked and untracked, not ignored files), so the
# build leaves no build/ or egg-info behind in the checkout and stale ignored files cannot leak in.
copy_tree() {
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      tar -C "$repo" --null --files-from=- --ignore-failed-read -cf - | tar -C "$tmp/src" -xf -
  else
    tar -C "$repo" --exclude=.venv --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
      --exclude=outputs --exclude=multirun --exclude=__pycache__ -cf - . | tar -C "$tmp/src" -xf -
  fi
}
step copy-source copy_tree
step venv "$PY" -m venv "$tmp/venv"
venv_py="$tmp/venv/bin/python"
step pip-upgrade "$venv_py" -m pip install --quiet --upgrade pip
step build-wheel "$venv_py" -m pip wheel --quiet --no-deps "$tmp/src" -w "$tmp/dist"
wheel=$(ls "$tmp/dist"/kd_lightning-*.whl)
step install-torch "$venv_py" -m pip install --quiet "torch==2.13.0"
step install-wheel "$venv_py" -m pip install --quiet "$wheel"

cd "$tmp/work"
bin="$tmp/venv/bin"
for script in kd-distill kd-train kd-report kd-sweep-report kd-llm-generate kd-llm-distill; do
  [ -x "$bin/$script" ] || fail "console script $script missing from the venv"
done

# The package is imported from the venv, and its configs are the ones inside the wheel.
step installed-configs "$venv_py" - "$tmp/venv" "$tmp/src/conf" <<'EOF'
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import kd_lightning
from kd_lightning.cli.common import CONFIG_DIR

venv, source = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
package, conf = Path(kd_lightning.__file__).resolve().parent, Path(CONFIG_DIR)
assert package.is_relative_to(venv), f"kd_lightning imported from {package}, not from the venv {venv}"
assert conf == package / "conf", f"CONFIG_DIR={conf}, expected the shipped {package / 'conf'}"
shipped, wanted = ({p.relative_to(d).as_posix() for p in d.rglob("*.yaml")} for d in (conf, source))
assert shipped == wanted, f"not shipped: {sorted(wanted - shipped)}, unexpected: {sorted(shipped - wanted)}"
print(len(shipped), "configs shipped in", conf)
with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
    for name in ("distill", "train", "llm_distill", "llm_generate"):
        compose(config_name=name)  # every entry point's primary config and its defaults list
        print("composed", name)
EOF

step cfg-job "$bin/kd-distill" --cfg job
grep -q '^task_name: distill$' "$tmp/logs/cfg-job.log" || fail "kd-distill --cfg job printed no config" "$tmp/logs/cfg-job.log"

# A user's own group option, from outside the package (block style: an unquoted ${...} is not valid YAML
# inside a {...} flow mapping).
cat >"$tmp/userconf/student/tiny_mlp.yaml" <<'EOF'
model:
  _target_: kd_lightning.models.MLP
  num_classes: ${data.num_classes}
  in_features: 40
  hidden: 8
  depth: 1
EOF
check_hidden() {  # check_hidden LOG: the composed config's student has hidden: 8
  "$venv_py" -c 'import sys, yaml; cfg = yaml.safe_load(open(sys.argv[1]))
assert cfg["student"]["model"]["hidden"] == 8, cfg["student"]' "$1" || fail "user student config not composed" "$1"
}
step config-dir "$bin/kd-distill" --config-dir "$tmp/userconf" student=tiny_mlp --cfg job
check_hidden "$tmp/logs/config-dir.log"
step searchpath "$bin/kd-distill" "hydra.searchpath=[file://$tmp/userconf]" student=tiny_mlp --cfg job
check_hidden "$tmp/logs/searchpath.log"

step one-epoch-run "$bin/kd-distill" trainer.max_epochs=1 teacher.fit.max_epochs=1 data.transfer_samples=500 \
  compare_scratch=false logger=none +trainer.enable_progress_bar=false trainer.accelerator=cpu
summary=$(find "$KD_LIGHTNING_HOME/runs" -name summary.json -print -quit)
[ -n "$summary" ] || fail "no summary.json under \$KD_LIGHTNING_HOME/runs" "$tmp/logs/one-epoch-run.log"
echo "check_wheel: ${summary#"$KD_LIGHTNING_HOME"/} written"

echo "check_wheel: PASS: $(basename "$wheel") installed in a fresh venv; shipped configs, --config-dir," \
  "hydra.searchpath and a 1-epoch run OK ($((SECONDS - start)) s)"
