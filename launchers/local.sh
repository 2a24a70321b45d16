#!/usr/bin/env bash
# One node, N processes: the DeepSpeed launcher starts N ranks of `python -m nested_reft_ds.train`.
#
# Usage:
#   launchers/local.sh [--num-gpus N] [--config FILE] [--deepspeed FILE] [--master-port PORT]
#                      [--resume auto|none|DIR|TAG] [--set SECTION.KEY=VALUE]... [--dry-run] [-- TRAIN_ARGS...]
#
# Every option has an environment equivalent: NUM_GPUS, CONFIG, DS_CONFIG, MASTER_PORT, RESUME, DRY_RUN=1.
#   --num-gpus     processes to start (default: the GPUs in CUDA_VISIBLE_DEVICES, else those nvidia-smi lists,
#                  else 1; on a CPU-only machine each rank is a CPU process). With CUDA_VISIBLE_DEVICES set,
#                  the first N of those GPUs are used.
#   --config       experiment YAML (default: the embedded tiny recipe)
#   --deepspeed    DeepSpeed JSON (default: the recipe's `# ds_config:` line, else built from train.zero_stage)
#   --resume       passed to the trainer (default: auto, i.e. continue from <output_dir>/checkpoints if present)
#   --dry-run      print the environment and the exact command instead of running it
# DEEPSPEED names the launcher executable (default: deepspeed).
#
# Example: launchers/local.sh --num-gpus 8 --config configs/qwen2.5_1.5b_gsm8k_8gpu.yaml
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo pipefail$/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"; }
die() { printf 'local.sh: error: %s\n' "$*" >&2; exit 2; }
# Print a command so that it can be pasted into a shell: plain words as they are, the rest single-quoted.
print_cmd() {
  local arg safe='^[A-Za-z0-9_./:=@%+,-]+$' out=()
  for arg in "$@"; do
    if [[ "$arg" =~ $safe ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${out[*]}"
}
# Value of a `# key: value` metadata line in a recipe (empty when absent).
recipe_meta() {
  if [[ -n "$1" && -f "$1" ]]; then sed -n "s/^# $2: *\([^ ]*\) *\$/\1/p" "$1" | head -n 1; fi
}

NUM_GPUS="${NUM_GPUS:-}"
CONFIG="${CONFIG:-}"
DS_CONFIG="${DS_CONFIG:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
RESUME="${RESUME:-auto}"
DRY_RUN="${DRY_RUN:-0}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
TRAIN_ARGS=()

while (($#)); do
  case "$1" in
    --num-gpus) NUM_GPUS="${2:?--num-gpus needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --deepspeed) DS_CONFIG="${2:?--deepspeed needs a value}"; shift 2 ;;
    --master-port) MASTER_PORT="${2:?--master-port needs a value}"; shift 2 ;;
    --resume) RESUME="${2:?--resume needs a value}"; shift 2 ;;
    --set) TRAIN_ARGS+=(--set "${2:?--set needs SECTION.KEY=VALUE}"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
  esac
done

# Which devices: the DeepSpeed launcher drops CUDA_VISIBLE_DEVICES whenever --num_gpus is given, so a visible
# set (numeric ids) is passed on as --include localhost:<the first N ids> instead.
VISIBLE=()
if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  IFS=, read -r -a VISIBLE <<< "$CUDA_VISIBLE_DEVICES"
fi
if [[ -z "$NUM_GPUS" ]]; then
  NUM_GPUS=1
  if ((${#VISIBLE[@]})); then
    NUM_GPUS="${#VISIBLE[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    detected="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    ((detected > 0)) && NUM_GPUS="$detected"
  fi
fi
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "--num-gpus must be a positive integer, got '$NUM_GPUS'"
if ((${#VISIBLE[@]})); then
  ((NUM_GPUS <= ${#VISIBLE[@]})) \
    || die "--num-gpus $NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES makes ${#VISIBLE[@]} visible"
  ids="${VISIBLE[*]:0:NUM_GPUS}"
  DEVICES=(--include "localhost:${ids// /,}")
else
  DEVICES=(--num_gpus "$NUM_GPUS")
fi
[[ -z "$CONFIG" || -f "$CONFIG" ]] || die "config file '$CONFIG' does not exist"
if [[ -z "$DS_CONFIG" ]]; then
  meta="$(recipe_meta "$CONFIG" ds_config)"
  [[ -n "$meta" ]] && DS_CONFIG="$REPO_ROOT/$meta"
fi
[[ -z "$DS_CONFIG" || -f "$DS_CONFIG" ]] || die "DeepSpeed config '$DS_CONFIG' does not exist"
declared="$(recipe_meta "$CONFIG" world_size)"
if [[ -n "$declared" && "$declared" != "$NUM_GPUS" ]]; then
  echo "local.sh: note: $CONFIG is written for world size $declared, launching $NUM_GPUS ranks" \
       "(gradient accumulation adapts; rollout.prompts_per_step must divide by $NUM_GPUS)" >&2
fi

# Environment: CPU threads split between the ranks; the package importable without `pip install`.
ENV_SET=()
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  export OMP_NUM_THREADS=$((cores / NUM_GPUS > 0 ? cores / NUM_GPUS : 1))
  ENV_SET+=(OMP_NUM_THREADS)
fi
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
ENV_SET+=(TOKENIZERS_PARALLELISM PYTHONPATH)

cmd=("$DEEPSPEED" "${DEVICES[@]}" --master_port "$MASTER_PORT" --module nested_reft_ds.train)
[[ -n "$CONFIG" ]] && cmd+=(--config "$CONFIG")
[[ -n "$DS_CONFIG" ]] && cmd+=(--deepspeed "$DS_CONFIG")
cmd+=(--resume "$RESUME" "${TRAIN_ARGS[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  for name in "${ENV_SET[@]}"; do print_cmd export "$name=${!name}"; done
  print_cmd "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
