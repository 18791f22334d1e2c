#!/usr/bin/env bash
# Cloud TPU VM launcher for ropd_jax: one entry for the whole life of a run.
#
#   launch/tpu.sh {create|setup|run|logs|stop|status|delete} [--dry-run] [--env FILE] [options] [--config.x=y ...]
#
# Settings come from launch/env.sh (if present) or --env FILE (see launch/env.example), then from flags.
# --dry-run prints every command instead of running it; it needs no settings (unset ones print as <NAME>).
# Every command that touches the VM addresses all workers (--worker=all): on a multi-host slice each host
# must run the same program. launch/worker.sh is what runs on each worker. See launch/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# On the workers: where the repo lives (worker.sh moves it there) and the archive name for the copy.
REMOTE_REPO=ropd_jax
REMOTE_TARBALL=ropd_jax.tgz
TEMP_FILES=()
trap 'rm -f "${TEMP_FILES[@]}"' EXIT

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND [--dry-run] [--env FILE] [options] [--config.x=y ...]
       launch/tpu.sh --dry-run [options]      (every command in order, printed)

commands:
  create   create the TPU VM (or a queued resource with --queued / QUEUED=true)
  setup    copy this checkout (or clone REPO_URL) to every worker and install it in a venv
  run      start the trainer on every worker in the background (survives ssh disconnects)
  logs     stream the trainer log of worker 0 (or --worker N / --worker all)
  stop     stop the trainer on every worker (SIGTERM, then SIGKILL after a grace period)
  status   describe the TPU / queued resource and whether the trainer runs on each worker
  delete   delete the TPU VM (with --queued: the queued resource and its node)

options (each overrides the env-file setting in parentheses):
  --dry-run                 print the commands, run nothing
  --env FILE                settings file (default: launch/env.sh when it exists)
  --project ID              (PROJECT)
  --zone ZONE               (ZONE)
  --name NAME               TPU VM name (TPU_NAME)
  --accelerator-type TYPE   e.g. v6e-8, v5litepod-8, v5p-16 (ACCELERATOR_TYPE)
  --runtime-version V       TPU software image; default picked from the accelerator (RUNTIME_VERSION)
  --spot                    spot capacity (SPOT=true)
  --preemptible             legacy preemptible capacity, tpu-vm only (PREEMPTIBLE=true)
  --queued                  create/delete through a queued resource (QUEUED=true)
  --config PATH             trainer config, relative to the repo root (CONFIG)
  --workdir URL             trainer workdir, e.g. gs://bucket/run1 (WORKDIR; default gs://BUCKET/RUN_NAME)
  --bucket NAME             GCS bucket for the default workdir (BUCKET)
  --run-name NAME           run folder in the bucket; the same name resumes (RUN_NAME; default: config stem)
  --repo-url URL            setup clones this repo instead of copying the checkout (REPO_URL)
  --ref REF                 branch, tag or commit to check out after the clone (REPO_REF)
  --worker N|all            worker for `logs` (default 0)
  --yes                     do not ask before deleting
  --config.KEY=VALUE        trainer config override, passed through by `run` (repeatable)
  -- ARGS...                everything after -- is passed to the trainer as is
EOF
}

die() {
  printf 'tpu.sh: %s\n' "$*" >&2
  exit 2
}

is_true() {
  case "${1,,}" in
    1 | true | yes | on) return 0 ;;
    *) return 1 ;;
  esac
}

# One shell word, quoted only when it needs it, so a printed command can be pasted back into a shell.
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it under --dry-run. Real runs echo it to stderr first, like `set -x`.
execute() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

# A required setting: under --dry-run an unset one becomes the placeholder <NAME>.
require() {
  local name=$1 flag=$2
  if [[ -z "${!name:-}" ]]; then
    if ((DRY_RUN)); then
      printf -v "$name" '<%s>' "$name"
    else
      die "$name is not set: put $name=... in launch/env.sh (see launch/env.example), pass --env FILE, or pass $flag."
    fi
  fi
}

default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "" ;;
  esac
}

# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
# `tpu.sh --dry-run [options]` with no command walks through the whole life of a run.
if [[ ${1:-} == --* ]] && [[ " $* " == *" --dry-run "* ]]; then
  common=() trainer=()
  while (($#)); do
    case "$1" in
      --) trainer+=("$@") && break ;;
      --config.*) trainer+=("$1") ;;
      *) common+=("$1") ;;
    esac
    shift
  done
  for step in create setup run logs stop status delete; do
    printf '# launch/tpu.sh %s\n' "$step"
    if [[ $step == run ]]; then
      bash "${BASH_SOURCE[0]}" "$step" "${common[@]}" "${trainer[@]}"
    else
      bash "${BASH_SOURCE[0]}" "$step" "${common[@]}"
    fi
  done
  exit 0
fi

COMMAND=${1:-}
case "$COMMAND" in
  create | setup | run | logs | stop | status | delete) shift ;;
  -h | --help | help)
    usage
    exit 0
    ;;
  "")
    usage >&2
    exit 2
    ;;
  *) die "unknown command '$COMMAND'; expected one of create, setup, run, logs, stop, status, delete (see --help)." ;;
esac

DRY_RUN=0
ENV_FILE=""
ASSUME_YES=0
LOG_WORKER=0
declare -A CLI=()
TRAINER_ARGS=()

flag_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value."
  printf '%s' "$2"
}

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --yes) ASSUME_YES=1 ;;
    --spot) CLI[SPOT]=true ;;
    --preemptible) CLI[PREEMPTIBLE]=true ;;
    --queued) CLI[QUEUED]=true ;;
    --env=*) ENV_FILE=${1#*=} ;;
    --env) ENV_FILE=$(flag_value "$@") && shift ;;
    --worker=*) LOG_WORKER=${1#*=} ;;
    --worker) LOG_WORKER=$(flag_value "$@") && shift ;;
    --config.*) TRAINER_ARGS+=("$1") ;;
    --)
      shift
      TRAINER_ARGS+=("$@")
      break
      ;;
    --project | --zone | --name | --accelerator-type | --runtime-version | --config | --workdir | --bucket | \
      --run-name | --repo-url | --ref)
      value=$(flag_value "$@")
      case "$1" in
        --project) CLI[PROJECT]=$value ;;
        --zone) CLI[ZONE]=$value ;;
        --name) CLI[TPU_NAME]=$value ;;
        --accelerator-type) CLI[ACCELERATOR_TYPE]=$value ;;
        --runtime-version) CLI[RUNTIME_VERSION]=$value ;;
        --config) CLI[CONFIG]=$value ;;
        --workdir) CLI[WORKDIR]=$value ;;
        --bucket) CLI[BUCKET]=$value ;;
        --run-name) CLI[RUN_NAME]=$value ;;
        --repo-url) CLI[REPO_URL]=$value ;;
        --ref) CLI[REPO_REF]=$value ;;
      esac
      shift
      ;;
    --project=* | --zone=* | --name=* | --accelerator-type=* | --runtime-version=* | --config=* | --workdir=* | \
      --bucket=* | --run-name=* | --repo-url=* | --ref=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option '$1' for '$COMMAND' (see --help); trainer overrides look like --config.x=y or go after --." ;;
  esac
  shift
done

if ((${#TRAINER_ARGS[@]})) && [[ $COMMAND != run ]]; then
  die "trainer arguments (${TRAINER_ARGS[0]} ...) only make sense with 'run'."
fi

# ---------------------------------------------------------------------------------------------------------
# Settings: env file, then flags, then defaults
# ---------------------------------------------------------------------------------------------------------
if [[ -n $ENV_FILE ]]; then
  [[ -f $ENV_FILE ]] || die "--env $ENV_FILE: no such file (copy launch/env.example)."
  # shellcheck source=/dev/null
  source "$ENV_FILE"
elif [[ -f $SCRIPT_DIR/env.sh ]]; then
  # shellcheck source=/dev/null
  source "$SCRIPT_DIR/env.sh"
fi
for key in "${!CLI[@]}"; do
  printf -v "$key" '%s' "${CLI[$key]}"
done

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v6e-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
SPOT=${SPOT:-false}
PREEMPTIBLE=${PREEMPTIBLE:-false}
QUEUED=${QUEUED:-false}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-}
VALID_UNTIL=${VALID_UNTIL:-}
CREATE_FLAGS=${CREATE_FLAGS:-}
CONFIG=${CONFIG:-configs/qwen.py}
BUCKET=${BUCKET:-}
WORKDIR=${WORKDIR:-}
RUN_NAME=${RUN_NAME:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
FORWARD_ENV=${FORWARD_ENV:-GEMINI_API_KEY GOOGLE_API_KEY OPENAI_API_KEY OPENAI_BASE_URL}

require PROJECT --project
require ZONE --zone
require TPU_NAME --name
LOCATION=(--project="$PROJECT" --zone="$ZONE")
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-qr}

ssh_workers() { # worker, remote command
  execute gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}

worker_script() { # the remote command that runs launch/worker.sh with these arguments
  printf 'bash %s/launch/worker.sh %s' "$REMOTE_REPO" "$(quote_all "$@")"
}

# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------
cmd_create() {
  require RUNTIME_VERSION --runtime-version
  if is_true "$SPOT" && is_true "$PREEMPTIBLE"; then
    die "SPOT and PREEMPTIBLE are both set; choose one (spot is the current offering)."
  fi
  local extra=()
  read -r -a extra <<<"$CREATE_FLAGS"
  if is_true "$QUEUED"; then
    is_true "$PREEMPTIBLE" && die "PREEMPTIBLE=true is not available for queued resources; use SPOT=true."
    local args=(gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${LOCATION[@]}"
      --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
    is_true "$SPOT" && args+=(--spot)
    [[ -n $VALID_UNTIL ]] && args+=(--valid-until-duration="$VALID_UNTIL")
    execute "${args[@]}" "${extra[@]}"
    ((DRY_RUN)) || echo "queued; 'launch/tpu.sh status' shows when the node is ACTIVE." >&2
  else
    local args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}"
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
    is_true "$SPOT" && args+=(--spot)
    is_true "$PREEMPTIBLE" && args+=(--preemptible)
    execute "${args[@]}" "${extra[@]}"
  fi
}

config_path() { # CONFIG without an ml_collections ":arg" suffix
  printf '%s' "${CONFIG%%:*}"
}

make_tarball() { # archive of the checkout: tracked and untracked-but-not-ignored files, so no venvs or builds
  local out=$1
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
      tar --null --ignore-failed-read -T - -czf "$out")
  else
    tar -C "$REPO_ROOT" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -czf "$out" .
  fi
}

cmd_setup() {
  local setup_args=(setup)
  # The offline demo assets (SmolLM2 GGUF, GSM problems) are only needed by the demo config.
  [[ $(basename "$(config_path)") == demo.py ]] && setup_args+=(--demo)
  local staging="$REMOTE_REPO.new"
  if [[ -n $REPO_URL ]]; then
    local fetch
    fetch="rm -rf $staging && git clone --quiet $(shell_quote "$REPO_URL") $staging"
    [[ -n $REPO_REF ]] && fetch+=" && git -C $staging checkout --quiet $(shell_quote "$REPO_REF")"
    ssh_workers all "$fetch && bash $staging/launch/worker.sh $(quote_all "${setup_args[@]}")"
    return
  fi
  local tarball
  if ((DRY_RUN)); then
    tarball="<archive of $REPO_ROOT>"
    printf '# archive the checkout: git ls-files --cached --others --exclude-standard | tar -czf ARCHIVE\n'
  else
    tarball=$(mktemp "${TMPDIR:-/tmp}/ropd_jax.XXXXXX.tgz")
    TEMP_FILES+=("$tarball")
    make_tarball "$tarball"
  fi
  execute gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" "${LOCATION[@]}" --worker=all
  ssh_workers all "rm -rf $staging && mkdir -p $staging && tar -xzf $REMOTE_TARBALL -C $staging && rm -f $REMOTE_TARBALL && bash $staging/launch/worker.sh $(quote_all "${setup_args[@]}")"
}

# Secrets (API keys) go to the workers as a file readable only by the user, never on a command line or in a
# config; only the variables set in this shell are sent, and values are never printed.
forward_secrets() {
  local names=() name
  for name in $FORWARD_ENV; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "FORWARD_ENV entry '$name' is not a variable name."
    [[ -n "${!name:-}" ]] && names+=("$name")
  done
  ((${#names[@]})) || return 0
  local file
  if ((DRY_RUN)); then
    file="<file with ${names[*]}>"
    printf '# forwards %s to the workers (values are never printed)\n' "${names[*]}"
  else
    file=$(mktemp "${TMPDIR:-/tmp}/ropd_env.XXXXXX") # mktemp creates it readable by the owner only
    TEMP_FILES+=("$file")
    for name in "${names[@]}"; do
      printf 'export %s=%q\n' "$name" "${!name}" >>"$file"
    done
  fi
  execute gcloud compute tpus tpu-vm scp "$file" "$TPU_NAME:.ropd_env" "${LOCATION[@]}" --worker=all
}

cmd_run() {
  local workdir=$WORKDIR
  if [[ -z $workdir ]]; then
    require BUCKET --bucket
    local run_name=${RUN_NAME:-$(basename "$(config_path)" .py)}
    workdir="gs://${BUCKET#gs://}/$run_name"
  fi
  [[ $(config_path) == /* ]] && die "CONFIG=$CONFIG is an absolute path; give it relative to the repo root (e.g. configs/qwen.py) so every worker finds it."
  forward_secrets
  ssh_workers all "$(worker_script run --config="$CONFIG" --workdir="$workdir" "${TRAINER_ARGS[@]}")"
}

cmd_logs() {
  [[ $LOG_WORKER == all || $LOG_WORKER =~ ^[0-9]+$ ]] || die "--worker $LOG_WORKER: expected a worker index or 'all'."
  ssh_workers "$LOG_WORKER" "$(worker_script logs)"
}

cmd_stop() {
  ssh_workers all "$(worker_script stop)"
}

cmd_status() {
  if is_true "$QUEUED"; then
    execute gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${LOCATION[@]}"
  else
    execute gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}"
  fi
  ssh_workers all "$(worker_script status)"
}

cmd_delete() {
  local quiet=()
  ((ASSUME_YES)) && quiet=(--quiet)
  if is_true "$QUEUED"; then
    # --force also deletes the node the queued resource created.
    execute gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${LOCATION[@]}" --force "${quiet[@]}"
  else
    execute gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" "${quiet[@]}"
  fi
}

"cmd_$COMMAND"
