#!/usr/bin/env bash
# Runs a sit_jax config on a Cloud TPU VM or pod slice: creates the TPU, installs sit_jax on every
# worker, starts the same command on all workers (one process per host; JAX finds its peers),
# streams worker 0's log, and deletes the TPU when the run ends.
#
#   launch/tpu_vm.sh --name sit-s16 --zone us-central2-b --accelerator v4-32 \
#       --config configs/sit_vits.py --workdir gs://MY_BUCKET/sit_vits \
#       -- --config.data.data_dir=gs://MY_BUCKET/tensorflow_datasets
#
# Everything after `--` is passed to `python -m sit_jax.main`. The workdir must be a gs:// path
# that every worker can write (checkpoints, metrics, backbone). Run it again with the same
# arguments after a preemption: training resumes from the last checkpoint in the workdir.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator TYPE --config CONFIG
                        --workdir gs://BUCKET/PATH [options] [-- MAIN_FLAGS...]

Required:
  --name NAME          TPU VM name (created, and deleted at the end unless --keep)
  --zone ZONE          e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p/v6e)
  --accelerator TYPE   e.g. v4-8, v4-32, v5litepod-16, v5p-32, v6e-8
  --config CONFIG      e.g. configs/sit_vits.py or configs/knn.py:dataset=imagenet2012
  --workdir GS_PATH    gs://bucket/path for checkpoints, metrics and the exported backbone

Options:
  --project PROJECT    GCP project (default: gcloud's configured project)
  --version RUNTIME    TPU software version (default chosen from the accelerator type)
  --repo URL           install from this git repository instead of copying this checkout
  --ref REF            branch or tag of --repo (default: main)
  --spot               create a Spot TPU (cheaper, preemptible)
  --existing           use an existing TPU VM called NAME (do not create it)
  --keep               do not delete the TPU at the end (or on Ctrl-C: the run goes on)
  --detach             start the run and return; the TPU is kept (follow the log with
                       gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0
                       --command 'tail -f ~/sit_jax.log'; stop the run, which saves its
                       step, with ... --worker=all --command 'kill -TERM $(cat ~/sit_jax.pid)')
  -h, --help           this message
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; echo "Run launch/tpu_vm.sh --help for the usage." >&2; exit 2; }

NAME="" ZONE="" ACCEL="" CONFIG="" WORKDIR="" PROJECT="" VERSION="" REPO="" REF="main"
SPOT=0 EXISTING=0 KEEP=0 DETACH=0
MAIN_FLAGS=()
# The value of option $1 is $2: present, and not the next option.
need_value() { (($# >= 2)) && [[ -n "$2" && "$2" != -* ]] || die "$1 needs a value"; }
while (($#)); do
  [[ "$1" == --?*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --option=value
  case "$1" in
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator|--accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --existing) EXISTING=1; shift ;;
    --keep) KEEP=1; shift ;;
    --detach) DETACH=1; KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$ACCEL" ]] || die "--accelerator is required"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path (every worker writes to it), got '$WORKDIR'"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The workers get this checkout's sit_jax/ and configs/ (or --repo's): a mistyped or uncopied
# config would fail only after the TPU was created and set up.
config_file="${CONFIG%%:*}"
[[ -n "$REPO" || ( "${config_file#./}" == configs/* && -f "$REPO_ROOT/$config_file" ) ]] || \
  die "--config must name a file in $REPO_ROOT/configs/ (the configs copied to the workers)," \
      "got '$config_file'"
# The flags as main parses them (the config, each --config.KEY and its type), where this checkout
# imports (sit_jax's requirements, no jax): on the workers a mistyped key ended the run only after
# the TPU was created and set up.
if [[ -z "$REPO" ]]; then
  if (cd "$REPO_ROOT" && python3 -c 'import sit_jax.main') >/dev/null 2>&1; then
    parse='import sys; from sit_jax import main; main.parse_flags(sys.argv)'
    (cd "$REPO_ROOT" && python3 -c "$parse" --config="$CONFIG" --workdir="$WORKDIR" \
        ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}) || exit 2
  else
    echo "tpu_vm.sh: sit_jax does not import here (python3 -c 'import sit_jax.main' in" \
         "$REPO_ROOT): its flags are checked on the TPU." >&2
  fi
fi
command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"

if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default --version for accelerator '$ACCEL'; pass --version" ;;
  esac
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

on_all() { "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }
on_worker0() { "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --command="$1"; }

# Run on every worker when the launcher is stopped (Ctrl-C) while the run goes on and the TPU is
# to be deleted: SIGTERM to main, which saves the current step (as on a preemption; JAX makes
# every host save the same one), then wait up to 10 minutes for its exit status.
STOP_RUN='pid=$(cat ~/sit_jax.pid 2>/dev/null) && kill -TERM "$pid" 2>/dev/null || exit 0
for _ in $(seq 120); do [ -s ~/sit_jax.rc ] && exit 0; sleep 5; done
echo "$(hostname): sit_jax.main still running 10 minutes after SIGTERM" >&2; exit 1'
RUNNING=0  # the run was started on the workers and has not ended

cleanup() {
  local status=$?
  if ((RUNNING && !KEEP)); then
    echo "Stopping the run on every worker before deleting $NAME; it saves the current step" \
         "(Ctrl-C again to delete at once) ..." >&2
    trap 'echo "Not waiting for the save." >&2' INT
    on_all "$STOP_RUN" && echo "The run saved its step and ended; start the same command" \
        "again to resume it." >&2 || echo "Could not confirm the save on every worker: the run" \
        "resumes from the latest checkpoint in $WORKDIR." >&2
  fi
  if ((KEEP)); then
    echo "TPU $NAME kept; delete it with: ${GCLOUD[*]} delete $NAME ${WHERE[*]} --quiet" >&2
  else
    echo "Deleting TPU $NAME ..." >&2
    "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet || \
      echo "Deleting $NAME failed: delete it by hand to stop paying for it." >&2
  fi
  exit "$status"
}

# 1. The TPU. -----------------------------------------------------------------------------------
if ((EXISTING)); then
  KEEP=1
else
  echo "Creating TPU $NAME ($ACCEL, $VERSION) in $ZONE ..."
  create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL"
          --version="$VERSION")
  ((SPOT)) && create+=(--spot)
  # Stopping gcloud stops its wait, not the creation.
  trap 'echo "Stopped while TPU $NAME was being created; if it comes up, delete it with:" \
    "${GCLOUD[*]} delete $NAME ${WHERE[*]} --quiet" >&2; exit 130' INT TERM
  if ! "${create[@]}"; then
    # A TPU of this name kept from a launch before (--keep, --detach, a lost connection): the
    # same command again, as after a preemption, met gcloud's ALREADY_EXISTS alone.
    state="$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null)" \
      || state=""
    if [[ "$state" == READY ]]; then
      echo "tpu_vm.sh: TPU $NAME exists and is READY: add --existing to run on it." >&2
    elif [[ -n "$state" ]]; then
      echo "tpu_vm.sh: TPU $NAME exists and is $state: delete it with ${GCLOUD[*]} delete $NAME" \
           "${WHERE[*]} --quiet, then launch again (the run resumes from $WORKDIR)." >&2
    fi
    exit 1
  fi
fi
trap cleanup EXIT
trap 'exit 130' INT TERM

# 2. sit_jax on every worker. -------------------------------------------------------------------
# A run started there before (--detach) may go on: a second one would replace its code, log and
# pid file, then fail on the busy TPU.
if ((EXISTING)); then
  on_worker0 'pid=$(cat ~/sit_jax.pid 2>/dev/null) && [ ! -s ~/sit_jax.rc ] \
    && kill -0 "$pid" 2>/dev/null && exit 3 || exit 0' && status=0 || status=$?
  if ((status == 3)); then
    echo "A run is going on on TPU $NAME: follow it with ${GCLOUD[*]} ssh $NAME ${WHERE[*]}" \
         "--worker=0 --command='tail -f ~/sit_jax.log', or stop it (it saves its step) with" \
         "... --worker=all --command='kill -TERM \$(cat ~/sit_jax.pid)', then launch again." >&2
    exit 1
  fi
fi
if [[ -n "$REPO" ]]; then
  on_all "rm -rf ~/sit_jax && git clone --depth=1 --branch='$REF' '$REPO' ~/sit_jax"
else
  tarball="$(mktemp -t sit_jax.XXXXXX.tar.gz)"
  tar -C "$REPO_ROOT" -czf "$tarball" --exclude=.git --exclude='*.pyc' --exclude=__pycache__ \
      --exclude='*.egg-info' sit_jax configs launch setup.py README.md
  "${GCLOUD[@]}" scp "$tarball" "$NAME":sit_jax.tar.gz "${WHERE[@]}" --worker=all
  rm -f "$tarball"
  on_all "rm -rf ~/sit_jax && mkdir -p ~/sit_jax && tar -xzf ~/sit_jax.tar.gz -C ~/sit_jax"
fi
# The TPU images run Ubuntu 22.04, whose python3 is 3.10; sit_jax and jax need 3.11 or newer,
# so each worker gets a Python 3.12 virtual environment from uv. jax[tpu] and sit_jax in one
# install, so that jax and libtpu come at the versions sit_jax admits; [gcs] reads and writes
# the gs:// workdir. --allow-existing: on a TPU set up before (--existing), uv refuses to make
# the environment again.
on_all "curl -LsSf https://astral.sh/uv/install.sh | sh \
        && ~/.local/bin/uv venv --quiet --python 3.12 --seed --allow-existing ~/sit_venv \
        && ~/.local/bin/uv pip install --quiet --python ~/sit_venv/bin/python \
             -e \"\$HOME/sit_jax[gcs]\" 'jax[tpu]>=0.10.2,<0.12'"

# 3. The same command on all workers, detached from the ssh sessions. ---------------------------
# ${A[@]+...}: an empty array under `set -u` is an error in bash < 4.4 (macOS's bash 3.2).
cmd=(../sit_venv/bin/python -m sit_jax.main --config="$CONFIG" --workdir="$WORKDIR"
     ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})
printf -v quoted '%q ' "${cmd[@]}"
# The detached shell's script, quoted as one word (a flag value may hold any character, '):
# main's pid in ~/sit_jax.pid (for STOP_RUN), its exit status in ~/sit_jax.rc.
printf -v detached '%q' "$quoted > ~/sit_jax.log 2>&1 & echo \$! > ~/sit_jax.pid; wait \$!; \
echo \$? > ~/sit_jax.rc"
RUNNING=1
on_all "cd ~/sit_jax && rm -f ~/sit_jax.rc ~/sit_jax.pid && \
  (nohup bash -c $detached > /dev/null 2>&1 &) && \
  sleep 1 && echo \"worker \$(hostname): started\""
echo "Started on all workers: ${cmd[*]}"
if ((DETACH)); then
  echo "Detached. Log of worker 0: ${GCLOUD[*]} ssh $NAME ${WHERE[*]} --worker=0 --command='tail -f ~/sit_jax.log'"
  exit 0
fi

# 4. Worker 0's log until the run ends, then its exit status. ----------------------------------
# ssh's own failures end it with 255 too (a dropped connection, a laptop that slept, a preempted
# TPU): the run has ended only when worker 0 holds its exit status, else the launcher reconnects.
log_lines="+1"  # the whole log; after a reconnection its last lines
while :; do
  on_worker0 "tail -n $log_lines -F ~/sit_jax.log 2>/dev/null & tail_pid=\$!; \
    while [ ! -f ~/sit_jax.rc ]; do sleep 10; done; sleep 2; kill \$tail_pid; \
    exit \$(cat ~/sit_jax.rc)" && rc=0 || rc=$?
  ((rc == 255)) || break
  if status="$(on_worker0 'cat ~/sit_jax.rc 2>/dev/null; true')"; then
    [[ "$status" =~ ^[0-9]+$ ]] && { rc="$status"; break; }
  else
    state="$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)')" || state=""
    if [[ -z "$state" ]]; then
      RUNNING=0 KEEP=1
      echo "Lost the connection to worker 0 and cannot reach TPU $NAME: the run may go on" \
           "(its log: ${GCLOUD[*]} ssh $NAME ${WHERE[*]} --worker=0 --command='tail -f" \
           "~/sit_jax.log')." >&2
      exit 255
    elif [[ "$state" != READY ]]; then
      RUNNING=0
      echo "TPU $NAME is $state: the run ended with it. Start the same command to resume" \
           "from the latest checkpoint in $WORKDIR." >&2
      exit 255
    fi
    sleep 30
  fi
  echo "Lost the connection to worker 0; the run goes on. Reconnecting ..." >&2
  log_lines=20
done
RUNNING=0
if ((rc)); then
  echo "The run failed (exit status $rc); the last lines of every worker's log:" >&2
  on_all "echo \"== \$(hostname)\"; tail -n 20 ~/sit_jax.log" || true
else
  echo "Done. Results in $WORKDIR (results.json, metrics.jsonl, checkpoints/, backbone/)."
fi
exit "$rc"
