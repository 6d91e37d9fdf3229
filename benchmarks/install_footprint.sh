#!/usr/bin/env bash
# Default-install footprint of sit_jax at one or more commits, one after the other: wall time of
# `pip install --no-cache-dir .` into a fresh venv, size of its site-packages, and import times
# (`import sit_jax.main`, then what a run imports before its first step), three times each.
#
#   bash benchmarks/install_footprint.sh a1d16da HEAD
set -euo pipefail
cd "$(dirname "$0")/.."
if (( $# == 0 )); then
  echo "install_footprint.sh: name the commits to measure, e.g. a1d16da HEAD (needs PyPI)" >&2
  exit 2
fi
for commit in "$@"; do
  git rev-parse --verify --quiet "$commit^{commit}" >/dev/null || {
    echo "install_footprint.sh: $commit is not a commit of this repository" >&2; exit 2; }
done
work=
trap 'rm -rf "$work"' EXIT  # a failed install (no network) leaves no venv behind
for commit in "$@"; do
  work=$(mktemp -d)
  git archive "$commit" | tar -x -C "$work"
  python -m venv "$work/venv"
  echo "== $commit (load $(cut -d' ' -f1 /proc/loadavg))"
  TIMEFORMAT="install %R s wall"
  time "$work/venv/bin/pip" install -q --no-cache-dir "$work"
  du -sh "$work/venv/lib/"python3*/site-packages
  for _ in 1 2 3; do
    (cd /tmp && "$work/venv/bin/python" -c "
import sys, time
t = time.perf_counter(); import sit_jax.main; a = time.perf_counter() - t
from sit_jax import pretrain, data, metrics; b = time.perf_counter() - t
print(f'import sit_jax.main {a:.2f} s, + pretrain, data, metrics {b:.2f} s, '
      f'tensorflow loaded: {\"tensorflow\" in sys.modules}')" 2>/dev/null)
  done
  rm -rf "$work"
done
