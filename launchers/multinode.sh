#!/usr/bin/env bash
# Several nodes listed in a hostfile (MPI style, `host slots=N`; see launchers/hostfile.example).
#
# Two ways to start the same job:
#   pdsh (default)  run once, on the first node: the DeepSpeed launcher reaches every host over passwordless
#                   ssh (pdsh) and starts `slots` ranks on each.
#   --no-ssh        run once on EVERY node, each with its own --node-rank 0..N-1 (no ssh between nodes; what
#                   SLURM/Kubernetes style schedulers do). Every node must see the same hostfile.
#
# Usage:
#   launchers/multinode.sh --hostfile FILE [--no-ssh --node-rank R] [--master-addr ADDR] [--master-port PORT]
#                          [--num-gpus N] [--config FILE] [--deepspeed FILE] [--resume auto|none|DIR|TAG]
#                          [--set SECTION.KEY=VALUE]... [--dry-run] [-- TRAIN_ARGS...]
#
# Environment equivalents: HOSTFILE, NO_SSH=1, NODE_RANK, MASTER_ADDR, MASTER_PORT, NUM_GPUS, CONFIG, DS_CONFIG,
# RESUME, DRY_RUN=1; DEEPSPEED names the launcher executable (default: deepspeed).
#   --master-addr  address of node rank 0 (default: the first host of the hostfile)
#   --num-gpus     ranks per node (default: each host's `slots`)
#   --deepspeed    DeepSpeed JSON (default: the recipe's `# ds_config:` line, else built from train.zero_stage)
#   --dry-run      print the environment and the exact command instead of running it
# In pdsh mode only NCCL_*, PYTHON*, UCX_*, MV2_* variables and the lines of ./.deepspeed_env (or
# ~/.deepspeed_env) reach the other nodes; put OMP_NUM_THREADS=... or NCCL_SOCKET_IFNAME=... there.
#
# Example (4 nodes x 8 GPUs, on each node i):
#   launchers/multinode.sh --hostfile hostfile --no-ssh --node-rank $i --config configs/qwen2.5_7b_math_32gpu.yaml
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo pipefail$/{/^set -euo/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"; }
die() { printf 'multinode.sh: error: %s\n' "$*" >&2; exit 2; }
# Print a command so that it can be pasted into a shell: plain words as they are, the rest single-quoted.
print_cmd() {
  local arg safe='^[A-Za-z0-9_./:=@%+,-]+$' out=()
  for arg in "$@"; do
    if [[ "$arg" =~ $safe ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  printf '%s\n' "${out[*]}"
}
recipe_meta() {
  if [[ -n "$1" && -f "$1" ]]; then sed -n "s/^# $2: *\([^ ]*\) *\$/\1/p" "$1" | head -n 1; fi
}

HOSTFILE="${HOSTFILE:-}"
NO_SSH="${NO_SSH:-0}"
NODE_RANK="${NODE_RANK:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
NUM_GPUS="${NUM_GPUS:-}"
CONFIG="${CONFIG:-}"
DS_CONFIG="${DS_CONFIG:-}"
RESUME="${RESUME:-auto}"
DRY_RUN="${DRY_RUN:-0}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
TRAIN_ARGS=()

while (($#)); do
  case "$1" in
    --hostfile) HOSTFILE="${2:?--hostfile needs a value}"; shift 2 ;;
    --no-ssh|--no_ssh) NO_SSH=1; shift ;;
    --node-rank|--node_rank) NODE_RANK="${2:?--node-rank needs a value}"; shift 2 ;;
    --master-addr|--master_addr) MASTER_ADDR="${2:?--master-addr needs a value}"; shift 2 ;;
    --master-port|--master_port) MASTER_PORT="${2:?--master-port needs a value}"; shift 2 ;;
    --num-gpus|--num_gpus) NUM_GPUS="${2:?--num-gpus needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --deepspeed) DS_CONFIG="${2:?--deepspeed needs a value}"; shift 2 ;;
    --resume) RESUME="${2:?--resume needs a value}"; shift 2 ;;
    --set) TRAIN_ARGS+=(--set "${2:?--set needs SECTION.KEY=VALUE}"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) die "unknown option '$1' (trainer arguments go after --; see --help)" ;;
  esac
done

[[ -n "$HOSTFILE" ]] || die "--hostfile is required (lines of 'host slots=N'; see launchers/hostfile.example)"
[[ -f "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' does not exist"
mapfile -t HOSTS < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
((${#HOSTS[@]} > 0)) || die "hostfile '$HOSTFILE' lists no hosts"
SLOTS="$(awk '!/^[[:space:]]*(#|$)/ {n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7);
               if (n == 0) bad = 1; total += n} END {print bad ? "" : total}' "$HOSTFILE")"
[[ -n "$SLOTS" ]] || die "every host line in '$HOSTFILE' needs slots=N with N >= 1"
if [[ -n "$NUM_GPUS" ]]; then
  [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "--num-gpus must be a positive integer, got '$NUM_GPUS'"
  WORLD_SIZE=$((NUM_GPUS * ${#HOSTS[@]}))
else
  WORLD_SIZE="$SLOTS"
fi
MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
if [[ "$NO_SSH" == 1 ]]; then
  [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "${#HOSTS[@]}" ]] \
    || die "--no-ssh needs --node-rank in 0..$((${#HOSTS[@]} - 1)) (this node's line in the hostfile), got '$NODE_RANK'"
elif [[ -n "$NODE_RANK" ]]; then
  die "--node-rank is only used with --no-ssh"
fi
[[ -z "$CONFIG" || -f "$CONFIG" ]] || die "config file '$CONFIG' does not exist"
if [[ -z "$DS_CONFIG" ]]; then
  meta="$(recipe_meta "$CONFIG" ds_config)"
  [[ -n "$meta" ]] && DS_CONFIG="$REPO_ROOT/$meta"
fi
[[ -z "$DS_CONFIG" || -f "$DS_CONFIG" ]] || die "DeepSpeed config '$DS_CONFIG' does not exist"
declared="$(recipe_meta "$CONFIG" world_size)"
if [[ -n "$declared" && "$declared" != "$WORLD_SIZE" ]]; then
  echo "multinode.sh: note: $CONFIG is written for world size $declared, this hostfile gives $WORLD_SIZE ranks" \
       "(gradient accumulation adapts; rollout.prompts_per_step must divide by $WORLD_SIZE)" >&2
fi

# Environment (inherited by the local ranks; see the pdsh note above for remote ones).
ENV_SET=()
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  per_node=$((WORLD_SIZE / ${#HOSTS[@]}))
  export OMP_NUM_THREADS=$((cores / per_node > 0 ? cores / per_node : 1))
  ENV_SET+=(OMP_NUM_THREADS)
fi
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
ENV_SET+=(TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG TOKENIZERS_PARALLELISM PYTHONPATH)

cmd=("$DEEPSPEED" --hostfile "$HOSTFILE")
if [[ "$NO_SSH" == 1 ]]; then
  cmd+=(--no_ssh --node_rank "$NODE_RANK")
else
  cmd+=(--launcher pdsh)
fi
cmd+=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ -n "$NUM_GPUS" ]] && cmd+=(--num_gpus "$NUM_GPUS")
cmd+=(--module nested_reft_ds.train)
[[ -n "$CONFIG" ]] && cmd+=(--config "$CONFIG")
[[ -n "$DS_CONFIG" ]] && cmd+=(--deepspeed "$DS_CONFIG")
cmd+=(--resume "$RESUME" "${TRAIN_ARGS[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
  for name in "${ENV_SET[@]}"; do print_cmd export "$name=${!name}"; done
  print_cmd "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
