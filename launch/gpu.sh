#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run jaxcpt on every GPU of one machine: one process that sees all local GPUs
# (single-process, multi-device JAX), so no jax.distributed setup is needed.
set -euo pipefail

PROG=${0##*/}
# Lets XLA overlap collectives with compute; see JAX's "GPU performance tips".
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

usage() {
  cat <<EOF
Usage: $PROG --config PATH --run-dir DIR [options] [-- key=value ...]

Run 'jaxcpt train' once, on all GPUs of this machine. First 'jaxcpt train --check'
(read-only: config, mesh, init source, tokenizer/model, data paths, layout) runs
with the same arguments and environment; if it fails, its message is printed and
nothing is started.

Options:
  --config PATH         YAML config to train with (required)
  --run-dir DIR         checkpoint and log directory (required)
  --gpus LIST           CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all GPUs)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory
                        JAX preallocates (default 0.90; JAX's own default is 0.75)
  --xla-flags FLAGS     more XLA flags, appended after the defaults (and after any
                        XLA_FLAGS already in the environment, which are kept)
  --dry-run             run only the read-only 'jaxcpt train --check' and print the
                        training command, prefixed "+ ", without running it (also
                        skips the nvidia-smi check)
  -h, --help            show this help

Everything after -- is passed to 'jaxcpt train' as dotted overrides (key=value).

Default XLA flags: $GPU_XLA_FLAGS

Example:
  $PROG --config configs/qwen2.5-7b-8xh100.yaml --run-dir runs/qwen-cpt -- optim.schedule.peak_lr=3e-5
EOF
}

# die, quote, quote_words
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="" RUN_DIR="" GPUS="" MEM_FRACTION=0.90 EXTRA_XLA_FLAGS="" DRY_RUN=0
OVERRIDES=()

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --config | --run-dir | --gpus | --mem-fraction | --xla-flags)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --config) CONFIG=$2 ;;
        --run-dir) RUN_DIR=$2 ;;
        --gpus) GPUS=$2 ;;
        --mem-fraction) MEM_FRACTION=$2 ;;
        --xla-flags) EXTRA_XLA_FLAGS=$2 ;;
      esac
      shift 2
      continue
      ;;
    --dry-run) DRY_RUN=1 ;;
    -*) die "unknown option '$1'" ;;
    *) die "unexpected argument '$1'; put config overrides after --, e.g. -- $1" ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die "missing --config PATH (the YAML config to train with)"
[[ -f $CONFIG ]] || die "--config '$CONFIG' is not a file"
[[ -n $RUN_DIR ]] || die "missing --run-dir DIR (where checkpoints and logs go)"
[[ $MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction '$MEM_FRACTION' is not a number in (0, 1]"
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  [[ $override == *=* ]] || die "override '$override' after -- is not key=value (e.g. optim.schedule.peak_lr=3e-5)"
done

if ((DRY_RUN)); then
  echo "# dry run: skipping the nvidia-smi check; running only the read-only 'jaxcpt train --check'"
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs NVIDIA GPUs and their driver"
  gpu_count=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -c .) ||
    die "nvidia-smi lists no GPUs; check the driver with 'nvidia-smi'"
  echo "# nvidia-smi: $gpu_count GPU(s) on $(hostname)"
fi
command -v jaxcpt >/dev/null ||
  die "'jaxcpt' is not on PATH; activate the environment it is installed in (pip install -e '.[test]')"

# Ours first, so flags already in the environment and --xla-flags win on conflict.
xla_flags="$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}${EXTRA_XLA_FLAGS:+ $EXTRA_XLA_FLAGS}"
environment=(XLA_FLAGS="$xla_flags" XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
[[ -z $GPUS ]] || environment+=(CUDA_VISIBLE_DEVICES="$GPUS")

train_args=(--config "$CONFIG" "run_dir=$RUN_DIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# The check sees what training would: the same arguments, environment and GPUs.
check=(env "${environment[@]}" jaxcpt train --check "${train_args[@]}")
command=(env "${environment[@]}" jaxcpt train "${train_args[@]}")
echo "+ $(quote_words "${check[@]}")"
status=0
"${check[@]}" || status=$?
if ((status != 0)); then
  echo "$PROG: error: 'jaxcpt train --check' failed (exit $status): see its message above; training was not started" >&2
  exit "$status"
fi
echo "+ $(quote_words "${command[@]}")"
if ((DRY_RUN)); then
  exit 0
fi
# exec: a SIGTERM (preemption, Ctrl-C) reaches the trainer, which can checkpoint.
exec "${command[@]}"
