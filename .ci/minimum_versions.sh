#!/usr/bin/env bash
# The declared lower bounds, tested: a fresh venv with every dependency (and the export extra) at the version
# pyproject.toml gives as its floor (.ci/minimum_versions.py), `pip check`, then every module's import
# (tests/test_installed.py) and a short fit of each task (the demo configs, tests/test_demo.py) on it.
#
#   .ci/minimum_versions.sh            # both phases
#   .ci/minimum_versions.sh install    # the venv only (.ci/run builds it while the long tier runs)
#   .ci/minimum_versions.sh test       # pip check and the tests on the venv built before, then removes it
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv="${TMPDIR:-/tmp}/residual-zoo-minimum"
phase="${1:-all}"
if [[ $phase == install || $phase == all ]]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$python" .ci/minimum_versions.py export > "$venv/minimum.txt"
  echo "minimum versions: $(tr '\n' ' ' < "$venv/minimum.txt")"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c "$venv/minimum.txt" -e '.[export]' pytest pytest-xdist pytest-timeout filelock
fi
if [[ $phase == test || $phase == all ]]; then
  trap 'rm -rf "$venv"' EXIT  # ~6 GB: not left behind
  "$venv/bin/python" -m pip check
  # the versions installed are the floors (a constraint pip could not honour would have failed the install)
  "$venv/bin/python" -m pip freeze | grep -iE "^($(cut -d= -f1 "$venv/minimum.txt" | paste -sd'|'))==" | tr '\n' ' '
  echo
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow and not slurm" -n "$(nproc 2>/dev/null || echo 2)" \
    tests/test_installed.py tests/test_demo.py -k "installed or make_demo or other_demo"
fi
