# shellcheck shell=bash
# Recommended XLA / NCCL settings for sit_jax on NVIDIA GPUs. Source it before starting Python:
#
#   source launch/gpu_xla_flags.sh && python -m sit_jax.main --config=... --workdir=...
#
# Flags already in XLA_FLAGS are kept and come last, so they win over these defaults
# (XLA takes the last value of a repeated flag). XLA aborts at start-up on an unknown flag: every
# flag below exists in jaxlib 0.10.2 and 0.11 (checked against XLA's DebugOptions). Measure a
# change with benchmarks/throughput.py before and after, on the same machine.
# Safe under `set -euo pipefail`.

_sit_jax_xla_flags=(
  # Schedules the gradient all-reduces (and FSDP all-gathers / reduce-scatters) to overlap with
  # the backward pass instead of running them after it.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Collectives on the highest-priority CUDA stream, so overlapped compute does not delay them.
  --xla_gpu_enable_highest_priority_async_stream=true
  # One all-reduce per ~128 MiB of gradients instead of one per parameter tensor (~150 tensors,
  # the 4096x4096 projection head among them): fewer, larger NCCL calls.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  # The same combining for FSDP (mesh fsdp > 1): parameter all-gathers and gradient reduce-scatters.
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
)

# ViT matmuls are large and plain (tokens x width), where cuBLAS is at least as fast as XLA's
# Triton GEMMs, and skipping Triton GEMM autotuning shortens compilation by minutes.
# SIT_JAX_TRITON_GEMM=1 keeps XLA's default (Triton can fuse a bias/GELU epilogue; measure).
if [[ "${SIT_JAX_TRITON_GEMM:-0}" != "1" ]]; then
  _sit_jax_xla_flags+=(--xla_gpu_enable_triton_gemm=false)
fi

# XLA's default command buffers (CUDA graphs over fusions, cuBLAS and custom calls) cut kernel
# launch overhead, which matters at small per-GPU batches. SIT_JAX_COMMAND_BUFFERS=0 turns them
# off: do so when profiling with Nsight Systems, to see one kernel per op.
if [[ "${SIT_JAX_COMMAND_BUFFERS:-1}" == "0" ]]; then
  _sit_jax_xla_flags+=(--xla_gpu_enable_command_buffer=)
fi

export XLA_FLAGS="${_sit_jax_xla_flags[*]}${XLA_FLAGS:+ ${XLA_FLAGS}}"
unset _sit_jax_xla_flags

# JAX preallocates this share of each GPU's memory (its default is 75%): more room for batches.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

# NCCL (multi-GPU / multi-node). Only warnings unless asked for more; NCCL picks the network
# (InfiniBand / RoCE / sockets) itself. On clusters whose nodes have several interfaces, set
# NCCL_SOCKET_IFNAME (and NCCL_IB_HCA) to the fabric's in the job script, not here.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
