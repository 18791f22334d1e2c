#!/usr/bin/env bash
# Runs ON each TPU VM worker; launch/tpu.sh calls it over ssh with --worker=all.
#
#   worker.sh setup [--demo]     move this checkout to $ROPD_DIR, create the venv, pip install -e . + jax[tpu]
#   worker.sh run TRAINER_ARGS   start `python -m ropd_jax.train TRAINER_ARGS` detached from the ssh session
#   worker.sh stop               SIGTERM the run's process group, SIGKILL after $STOP_GRACE seconds
#   worker.sh status             whether a run is active, and the end of its log
#   worker.sh logs [LINES]       follow the log
set -euo pipefail

ROPD_DIR=${ROPD_DIR:-$HOME/ropd_jax}              # where the repo lives on the worker
VENV=${VENV:-$HOME/ropd_venv}                     # outside ROPD_DIR, so a new setup keeps it
PYTHON_VERSION=${PYTHON_VERSION:-3.11}            # the package needs >= 3.11 (tomllib); uv fetches it if absent
LOG_FILE=${LOG_FILE:-$HOME/ropd_train.log}
PID_FILE=${PID_FILE:-$HOME/ropd_train.pid}
SECRETS_FILE=${SECRETS_FILE:-$HOME/.ropd_env}     # written by `tpu.sh run` (API keys), never by a config
STOP_GRACE=${STOP_GRACE:-120}                     # seconds for the trainer to finish a checkpoint on SIGTERM

die() {
  printf 'worker.sh on %s: %s\n' "$(hostname)" "$*" >&2
  exit 1
}

alive() { # a zombie (exited, not yet reaped by init) counts as gone
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}

running_pid() { # prints the pid of the active run; fails when none runs
  [[ -f $PID_FILE ]] || return 1
  local pid
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  printf '%s\n' "$pid"
}

find_uv() {
  if command -v uv >/dev/null; then
    command -v uv
    return
  fi
  if [[ ! -x $HOME/.local/bin/uv ]]; then
    # Ubuntu 24.04 images mark the system Python as externally managed; a --user install of one tool is fine.
    python3 -m pip install --user --quiet uv ||
      python3 -m pip install --user --quiet --break-system-packages uv
  fi
  printf '%s\n' "$HOME/.local/bin/uv"
}

cmd_setup() {
  local demo=0
  while (($#)); do
    case "$1" in
      --demo) demo=1 ;;
      *) die "setup: unknown option '$1'." ;;
    esac
    shift
  done
  local pid src
  if pid=$(running_pid); then
    die "a run is active (pid $pid); stop it first with: launch/tpu.sh stop"
  fi
  src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ $src != "$ROPD_DIR" ]]; then
    rm -rf "$ROPD_DIR"
    mv "$src" "$ROPD_DIR"
  fi
  local uv
  uv=$(find_uv)
  # The TPU images ship Python 3.10 and often no python3-venv; uv brings its own interpreter and pip (--seed,
  # which `python -m ropd_jax.assets install` uses).
  [[ -x $VENV/bin/python ]] || "$uv" venv --seed --python "$PYTHON_VERSION" "$VENV"
  "$uv" pip install --python "$VENV/bin/python" -e "$ROPD_DIR" "jax[tpu]"
  if ((demo)); then
    "$VENV/bin/python" -m ropd_jax.assets install
  fi
  "$VENV/bin/python" -c 'import jax, ropd_jax; print("ropd_jax installed; jax", jax.__version__)'
}

cmd_run() {
  local pid
  if pid=$(running_pid); then
    die "a run is already active (pid $pid); stop it first with: launch/tpu.sh stop"
  fi
  [[ -x $VENV/bin/python ]] || die "no venv at $VENV; run: launch/tpu.sh setup"
  cd "$ROPD_DIR"
  if [[ -f $SECRETS_FILE ]]; then
    chmod 600 "$SECRETS_FILE"
    set -a
    # shellcheck source=/dev/null
    source "$SECRETS_FILE"
    set +a
  fi
  printf '\n=== %s %s: python -m ropd_jax.train %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$*" >>"$LOG_FILE"
  # setsid: its own session and process group, so an ssh disconnect does not reach it and `stop` can signal
  # the whole group; nohup and the redirections detach it from the terminal so ssh returns at once.
  setsid nohup "$VENV/bin/python" -m ropd_jax.train "$@" >>"$LOG_FILE" 2>&1 </dev/null &
  pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"
  printf 'started the trainer on %s (pid %s); log: %s\n' "$(hostname)" "$pid" "$LOG_FILE"
}

cmd_stop() {
  local pid waited=0
  if ! pid=$(running_pid); then
    rm -f "$PID_FILE"
    printf 'no run active on %s\n' "$(hostname)"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  while alive "$pid" && ((waited < STOP_GRACE)); do
    sleep 1
    waited=$((waited + 1))
  done
  if alive "$pid"; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
    printf 'killed the trainer on %s (pid %s) after %ss\n' "$(hostname)" "$pid" "$STOP_GRACE"
  else
    printf 'stopped the trainer on %s (pid %s)\n' "$(hostname)" "$pid"
  fi
  rm -f "$PID_FILE"
}

cmd_status() {
  local pid
  if pid=$(running_pid); then
    printf '%s: running (pid %s)\n' "$(hostname)" "$pid"
  else
    printf '%s: not running\n' "$(hostname)"
  fi
  [[ -f $LOG_FILE ]] && tail -n 5 "$LOG_FILE"
  return 0
}

cmd_logs() {
  local lines=${1:-200}
  [[ $lines =~ ^[0-9]+$ ]] || die "logs: LINES must be a number, got '$lines'."
  touch "$LOG_FILE"
  exec tail -n "$lines" -F "$LOG_FILE"
}

command=${1:-}
[[ $# -gt 0 ]] && shift
case "$command" in
  setup) cmd_setup "$@" ;;
  run) cmd_run "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  logs) cmd_logs "$@" ;;
  *) die "unknown command '$command'; expected setup, run, stop, status or logs." ;;
esac
