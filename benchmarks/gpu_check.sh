#!/usr/bin/env bash
# One GPU check that fits a short lease: jaxcpt vs transformers + PyTorch on the Llama-3.2-1B shape,
# seq 4096, bf16, cuDNN attention, interleaved; writes MFU, tokens/s, peak memory and the ratio to
# PyTorch as JSON. Installs nothing from the network: it runs on the GPU machine's own jax, torch
# and transformers, with this checkout on PYTHONPATH (the benchmark imports no grain; wheels in
# .whl/, if carried, are installed offline first).
#
#   benchmarks/gpu_check.sh [--batch N] [--steps N] [--warmup N] [--out DIR] [--dry-run] [--smoke]
#
# --smoke: the same benchmark, end to end, on a tiny model (seq 128, XLA attention, 2 steps) on
# whatever backend JAX has, GPU or not (under a minute): checks the machine's jax, torch and
# transformers run it, before the real check spends the lease. Writes train_throughput_tiny_smoke.json.
# Exit status: 0 done, 2 bad arguments or no GPU visible to JAX, else the benchmark's own.
set -euo pipefail
cd "$(dirname "$0")/.."

batch=8 steps=10 warmup=2 out="${OUT:-benchmarks/results}" dry_run=0 smoke=0
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --batch) batch="${2:?--batch needs a number}"; shift 2 ;;
        --steps) steps="${2:?--steps needs a number}"; shift 2 ;;
        --warmup) warmup="${2:?--warmup needs a number}"; shift 2 ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --smoke) smoke=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
for n in "$batch" "$steps" "$warmup"; do
    case "$n" in ''|*[!0-9]*) echo "gpu_check.sh: '$n' is not a whole number" >&2; exit 2 ;; esac
done

python=${PYTHON:-python3}
json="$out/train_throughput_llama-3.2-1b_gpu.json"
bench=("$python" benchmarks/train_throughput.py --shape llama-3.2-1b --seq-len 4096 --batch "$batch"
       --steps "$steps" --warmup "$warmup" --dtype bfloat16 --attention cudnn --remat minimal
       --loss-chunk 1024 --vs-torch --torch-modes compile --require-gpu --out "$json")
if [ "$smoke" = 1 ]; then
    bench=("$python" benchmarks/train_throughput.py --shape tiny --seq-len 128 --batch 2 --steps 2 --warmup 1
           --attention xla --loss-chunk 64 --vs-torch --torch-modes compile
           --out "$out/train_throughput_tiny_smoke.json")
fi
if [ "$dry_run" = 1 ]; then
    echo "would run: ${bench[*]}"
    exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ "$smoke" = 0 ] && ! "$python" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no GPU visible to JAX (jax.default_backend() is not 'gpu'); this check needs an NVIDIA GPU" >&2
    exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"${bench[@]}"
