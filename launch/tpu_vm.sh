#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run jaxcpt on a Cloud TPU VM (one host or a multi-host pod slice) with gcloud.
#
# Every step is one gcloud command, printed before it runs as "+ gcloud ...", so a
# --dry-run shows the whole plan and executes nothing. See launch/README.md.
set -euo pipefail

PROG=${0##*/}
# Where install and train put files on each worker, relative to the remote home.
REMOTE_DIR=jaxcpt-run
REMOTE_LOG=$REMOTE_DIR/train.log

usage() {
  cat <<EOF
Usage: $PROG COMMAND --name NAME --zone ZONE [options] [-- key=value ...]

Create a TPU VM (or a queued resource), install jaxcpt on every worker, run the
same 'jaxcpt train' on all workers, follow the logs, and delete the VM.

Commands:
  create    create the TPU VM (--queued: a queued resource, waited on until ACTIVE)
  install   pip install 'jax[tpu]' and jaxcpt on every worker
  train     copy the config to every worker, run the read-only 'jaxcpt train --check'
            on all of them (training starts only if it passes everywhere), then start
            'jaxcpt train' on all of them, restarted while it exits 75 (stopped early
            by a signal, checkpoint saved), at most --max-restarts times
  logs      follow the training log of one worker (or all)
  delete    delete the TPU VM (--queued: the queued resource, with --force)
  all       create, install, train, then logs

Options:
  --name NAME             TPU VM name; with --queued also the queued-resource id (required)
  --zone ZONE             e.g. us-east5-a (required)
  --project PROJECT       gcloud project (default: gcloud's configured project)
  --accelerator-type T    e.g. v5p-64, v5litepod-16, v6e-32 (required by create)
  --runtime-version V     TPU software version (default from the accelerator type:
                          v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                          v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --queued                create/delete through a queued resource
  --spot                  Spot capacity (can be preempted; resume from the checkpoint)
  --reserved              use the project's reservation
  --wheel PATH            install this local wheel (copied to every worker) ...
  --git-url URL           ... or install from git, e.g. https://github.com/ORG/jaxcpt.git@main
  --config PATH           local YAML config, copied to every worker (required by train)
  --run-dir gs://B/RUN    shared run directory on GCS: checkpoints go to gs://B/RUN/checkpoints (required by train);
                          metrics, reports and HF exports stay in ~/jaxcpt-run/run on worker 0
  --foreground            stream worker output here and return when training ends, with
                          its exit code, instead of returning at once (see 'logs'); training
                          runs detached from the ssh session either way, so Ctrl-C or a
                          dropped connection stops the streaming, not training
  --max-restarts N        restart 'jaxcpt train' on the workers when it exits 75 (stopped
                          early: preempted, SIGTERM, hang-up), at most N times (default 3;
                          0 = never)
  --worker N|all          worker whose log 'logs' follows (default 0)
  --yes                   delete without gcloud's confirmation prompt
  --dry-run               print every command, one per line prefixed "+ ", run nothing
  -h, --help              show this help

Everything after -- is passed to 'jaxcpt train' as dotted overrides (key=value).
The train command always gets distributed.initialize=true: on a TPU VM
jax.distributed.initialize() finds the coordinator and the process ids by itself.

Example:
  $PROG all --name cpt-v5p --zone us-east5-a --accelerator-type v5p-64 --spot \\
    --git-url https://github.com/ORG/jaxcpt.git --config configs/llama3.1-8b-v5p64.yaml \\
    --run-dir gs://my-bucket/runs/llama31-8b -- optim.schedule.peak_lr=3e-5
EOF
}

# die, quote, quote_words
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Like quote_words, but double-quotes where that is exact, for the command strings
# sent to the workers: "+ ..." then shows them inside '...' without '\'' noise.
quote_remote_words() {
  local out="" word
  for word in "$@"; do
    if [[ ! $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ && $word != *[\$\`\"\\!]* ]]; then
      out+="${out:+ }\"$word\""
    else
      out+="${out:+ }$(quote "$word")"
    fi
  done
  printf '%s' "$out"
}

# Print a command as "+ cmd args..." (copy-pasteable), then run it unless --dry-run.
run() {
  echo "+ $(quote_words "$@")"
  if ((DRY_RUN)); then
    return 0
  fi
  "$@"
}

default_runtime_version() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------- arguments
COMMAND="" NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" RUNTIME_VERSION=""
QUEUED=0 SPOT=0 RESERVED=0 WHEEL="" GIT_URL="" CONFIG="" RUN_DIR=""
FOREGROUND=0 LOG_WORKER=0 YES=0 DRY_RUN=0 MAX_RESTARTS=3
OVERRIDES=()
# 'jaxcpt train' exits with this after a signal stopped it with a checkpoint saved
# (jaxcpt/exit_codes.py: EXIT_STOPPED_EARLY); running it again resumes.
STOPPED_EARLY=75

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --name | --zone | --project | --accelerator-type | --runtime-version | --wheel | \
      --git-url | --config | --run-dir | --worker | --max-restarts)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --max-restarts) MAX_RESTARTS=$2 ;;
        --name) NAME=$2 ;;
        --zone) ZONE=$2 ;;
        --project) PROJECT=$2 ;;
        --accelerator-type) ACCELERATOR_TYPE=$2 ;;
        --runtime-version) RUNTIME_VERSION=$2 ;;
        --wheel) WHEEL=$2 ;;
        --git-url) GIT_URL=$2 ;;
        --config) CONFIG=$2 ;;
        --run-dir) RUN_DIR=$2 ;;
        --worker) LOG_WORKER=$2 ;;
      esac
      shift 2
      continue
      ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --foreground) FOREGROUND=1 ;;
    --yes) YES=1 ;;
    --dry-run) DRY_RUN=1 ;;
    create | install | train | logs | delete | all)
      [[ -z $COMMAND ]] || die "two commands given ('$COMMAND' and '$1'); give one"
      COMMAND=$1
      ;;
    -*) die "unknown option '$1'" ;;
    *) die "unknown command '$1'; expected one of: create install train logs delete all" ;;
  esac
  shift
done

[[ -n $COMMAND ]] || die "missing COMMAND (create, install, train, logs, delete or all)"
[[ -n $NAME ]] || die "missing --name NAME (the TPU VM to $COMMAND)"
[[ -n $ZONE ]] || die "missing --zone ZONE (the zone of TPU VM '$NAME', e.g. us-east5-a)"
[[ $LOG_WORKER =~ ^([0-9]+|all)$ ]] || die "--worker '$LOG_WORKER' is not a worker number or 'all'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts '$MAX_RESTARTS' is not a whole number (0 = never restart)"
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $override == *=* ]] || die "override '$override' after -- is not key=value (e.g. optim.schedule.peak_lr=3e-5)"
done

wants() { [[ $COMMAND == "$1" || $COMMAND == all ]]; }

# Check every argument the chosen steps need before running any of them, so 'all'
# does not create a VM and then stop at a missing --config.
if wants create; then
  [[ -n $ACCELERATOR_TYPE ]] || die "missing --accelerator-type TYPE (e.g. v5p-64) for create"
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
      die "no default --runtime-version for accelerator type '$ACCELERATOR_TYPE'; pass one (see 'gcloud compute tpus versions list --zone $ZONE')"
  fi
  ((SPOT + RESERVED <= 1)) || die "--spot and --reserved exclude each other; pick one"
fi
if wants install; then
  [[ -n $WHEEL || -n $GIT_URL ]] || die "missing --wheel PATH or --git-url URL (what install puts on each worker)"
  [[ -z $WHEEL || -z $GIT_URL ]] || die "--wheel and --git-url exclude each other; pick one"
  [[ -z $WHEEL || -f $WHEEL ]] || die "--wheel '$WHEEL' is not a file (build one with 'pip wheel --no-deps -w dist .')"
fi
if wants train; then
  [[ -n $CONFIG ]] || die "missing --config PATH (the YAML config to train with)"
  [[ -f $CONFIG ]] || die "--config '$CONFIG' is not a file"
  [[ -n $RUN_DIR ]] || die "missing --run-dir gs://BUCKET/RUN (where checkpoints and logs go)"
  [[ $RUN_DIR == gs://* ]] ||
    die "--run-dir '$RUN_DIR' must be a gs:// path: every TPU worker runs the same train command and all of them must save to and resume from one shared checkpoint directory; a local path would give each host its own partial copy, lost when the VM is deleted"
fi

LOCATION=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command "$1"
}

# ---------------------------------------------------------------- steps
create_vm() {
  local capacity=()
  if ((SPOT)); then capacity=(--spot); fi
  if ((RESERVED)); then capacity=(--reserved); fi
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"}
    wait_until_active
  else
    # Returns once the VM is READY.
    run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"}
  fi
}

# A queued resource is granted when capacity frees up, which can take hours.
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" --format='value(state.state)')
  echo "+ $(quote_words "${describe[@]}")  # repeated every 60 s until ACTIVE"
  if ((DRY_RUN)); then
    return 0
  fi
  local state
  while :; do
    state=$("${describe[@]}") || die "could not describe queued resource '$NAME' in $ZONE"
    [[ $state == ACTIVE ]] && return 0
    case $state in
      FAILED | SUSPENDING | SUSPENDED) die "queued resource '$NAME' is $state; see 'gcloud compute tpus queued-resources describe $NAME --zone=$ZONE'" ;;
    esac
    echo "# queued resource $NAME is ${state:-not visible yet}; checking again in 60 s"
    sleep 60
  done
}

install_jaxcpt() {
  local package
  if [[ -n $WHEEL ]]; then
    ssh_all "mkdir -p ~/$REMOTE_DIR"
    run gcloud compute tpus tpu-vm scp "$WHEEL" "$NAME:$REMOTE_DIR/" "${LOCATION[@]}" --worker=all
    package="./${WHEEL##*/}[gcs]"
  else
    package="jaxcpt[gcs] @ git+${GIT_URL#git+}"
  fi
  # 'jax[tpu]' pulls the libtpu matching the jax version jaxcpt resolves to.
  ssh_all "mkdir -p ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && python3 -m pip install --upgrade pip && python3 -m pip install --upgrade $(quote_remote_words "jax[tpu]" "$package")"
}

start_training() {
  local config_name=${CONFIG##*/}
  ssh_all "mkdir -p ~/$REMOTE_DIR"
  run gcloud compute tpus tpu-vm scp "$CONFIG" "$NAME:$REMOTE_DIR/$config_name" "${LOCATION[@]}" --worker=all
  # Checkpoints go to GCS, shared by all workers; the run directory (metrics, reports,
  # HF exports, written by worker 0 only) is local to each worker, under ~/$REMOTE_DIR/run.
  local args=(--config "$config_name" run_dir=run "checkpoint.directory=$RUN_DIR/checkpoints"
    distributed.initialize=true ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  local check train
  check=$(quote_remote_words jaxcpt train --check "${args[@]}")
  train=$(quote_remote_words jaxcpt train "${args[@]}")
  # pip --user puts the jaxcpt script in ~/.local/bin, which a non-login ssh shell
  # does not have on PATH; $HOME and $PATH must expand on the worker, not here.
  # shellcheck disable=SC2016
  local prelude='cd ~/'"$REMOTE_DIR"' && export PATH="$HOME/.local/bin:$PATH"'
  # Every worker checks first, in the foreground: a worker that failed its check would
  # leave the others waiting in jax.distributed.initialize, so none starts unless all pass.
  ssh_all "$prelude && $check" ||
    die "'jaxcpt train --check' failed on at least one worker: see its message above; training was not started"
  # Restart while training exits $STOPPED_EARLY (stopped by a signal after saving), at most
  # $MAX_RESTARTS times; then the run's own exit code is the loop's. Every worker loops in step:
  # all hosts stop at the same step, so all of them restart together.
  # shellcheck disable=SC2016
  local loop='restarts=0; while :; do '"$train"'; code=$?; '
  # shellcheck disable=SC2016
  loop+='if [ "$code" -ne '"$STOPPED_EARLY"' ] || [ "$restarts" -ge '"$MAX_RESTARTS"' ]; then break; fi; '
  # shellcheck disable=SC2016
  loop+='restarts=$((restarts + 1)); echo "jaxcpt train stopped early (exit '"$STOPPED_EARLY"'); restart $restarts of '"$MAX_RESTARTS"'"; done; exit "$code"'
  # Detached from the ssh session (SIGHUP ignored, as with nohup, and no terminal), so a
  # dropped connection neither stops nor kills training; output goes to the log.
  local detached="{ ( trap \"\" HUP; $loop ) > ~/$REMOTE_LOG 2>&1 < /dev/null & }"
  if ((FOREGROUND)); then
    # Follow the log until the loop ends; the ssh command's exit code is the loop's.
    # shellcheck disable=SC2016
    if ! ssh_all "$prelude && $detached"' && pid=$! && tail -n +1 -f --pid="$pid" ~/'"$REMOTE_LOG"'; wait "$pid"'; then
      echo "$PROG: training on at least one worker ended with an error or was stopped early (exit $STOPPED_EARLY after $MAX_RESTARTS restart(s)); see the output above; run 'train' again with the same --run-dir to resume" >&2
      exit 1
    fi
  else
    ssh_all "$prelude && $detached && echo \"started on \$(hostname); log: ~/$REMOTE_LOG\""
  fi
}

follow_logs() {
  # Each line is prefixed with the worker's hostname, useful with --worker all.
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$LOG_WORKER" \
    --command "tail -n +1 -F ~/$REMOTE_LOG | sed -u \"s/^/[\$(hostname)] /\""
}

delete_vm() {
  local confirm=()
  if ((YES)); then confirm=(--quiet); fi
  if ((QUEUED)); then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force ${confirm[@]+"${confirm[@]}"}
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" ${confirm[@]+"${confirm[@]}"}
  fi
}

if ((DRY_RUN)); then
  echo "# dry run: printing the commands, running none"
fi
case $COMMAND in
  create) create_vm ;;
  install) install_jaxcpt ;;
  train) start_training ;;
  logs) follow_logs ;;
  delete) delete_vm ;;
  all)
    create_vm
    install_jaxcpt
    start_training
    if ((!FOREGROUND)); then
      echo "# following the log of worker $LOG_WORKER; Ctrl-C stops following, not training"
      follow_logs
    fi
    ;;
esac
