#!/usr/bin/env bash
# The accelerator check (benchmarks/device_check.py): on a machine with one GPU, under 6 minutes,
# prints one JSON line on stdout (progress on stderr). --dry-run: the same on the CPU with tiny
# shapes, run by tests/test_device_check.py so that the script cannot rot.
#
#   bash benchmarks/device_check.sh --out=device_check.json
#   bash benchmarks/device_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --dry-run "* || " $* " == *" --dry_run "* ]]; then  # device_check.py's spelling too
  export JAX_PLATFORMS=cpu
  # A dry run measures nothing: compile fast. No LLVM optimisation halves XLA:CPU's compile
  # time. (--xla_cpu_use_fusion_emitters=false would take a third off what is left, but jaxlib
  # 0.11 no longer knows the flag and aborts at the first use of jax.)
  export XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-}"
else
  # shellcheck source=../launch/gpu_xla_flags.sh
  source launch/gpu_xla_flags.sh
fi
args=()
for a in "$@"; do
  args+=("${a/--dry-run/--dry_run}")
done
# python3: GPU images often have no plain `python` (PYTHON overrides).
exec "${PYTHON:-python3}" benchmarks/device_check.py "${args[@]}"
