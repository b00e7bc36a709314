#!/usr/bin/env bash
# Submit a pretraining job and, after it succeeds, its evaluation (linear + kNN) as a dependent job.
#
#   slurm/submit.sh [options] CONFIG.yaml [key=value ...]
#
# Options (everything else that starts with -- is passed to both sbatch calls, in --name=value form,
# e.g. --account=proj123 --qos=high --constraint=a100 --mail-type=END):
#   --nodes N             nodes for the pretraining (default 1)
#   --gpus-per-node G     GPUs per node, one task each (default 1)
#   --cpu                 CPU processes instead of GPUs (small runs, tests): no GPUs requested,
#                         data.device=cpu for training and device=cpu for the evaluation
#   --tasks-per-node T    tasks per node (default G, or 1 with --cpu)
#   --cpus-per-task C     CPUs per task, used as DALI threads (default on GPU runs: the partition's CPUs
#                         per node / tasks per node, from sinfo; else the job's CPUs per node / tasks)
#   --partition P         partition of both jobs (default: the site's default)
#   --time T              time limit of the pretraining (default: the partition's)
#   --eval-time T         time limit of the evaluation (default: the partition's)
#   --eval-nodes N        nodes for the evaluation (default 1; it uses the same tasks per node)
#   --signal-seconds S    checkpoint-and-requeue this long before the time limit (default 600)
#   --dry-run             print the sbatch commands instead of running them
#   -h, --help            this text
#
# The config is read (and validated) here with the trainer's own resolution, so data.train, data.val
# and output_dir are the values `unmix train` will use; relative paths are made absolute. Slurm's
# logs go to OUTPUT_DIR/slurm-<job name>-<job id>.out.
#
# Environment: UNMIX_VENV / UNMIX_PYTHON (the Python that can import `unmix.training`, default
# $UNMIX_VENV/bin/python or python3), and everything pretrain.sbatch and linear.sbatch read
# (UNMIX_VENV, UNMIX_SETUP, UNMIX_SRUN_ARGS, UNMIX_LINEAR_ARGS, UNMIX_KNN_ARGS, UNMIX_EVAL, ...): sbatch
# exports the submitting environment to the jobs (unless the site sets SBATCH_EXPORT).
#
# Output: two lines, "pretrain job <id> ..." and "eval job <id> ...".
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}
die() {
  echo "submit.sh: $*" >&2
  exit 2
}

nodes=1
gpus=1
cpu=0
tasks=""
cpus_per_task=""
partition=""
time_limit=""
eval_time=""
eval_nodes=1
signal_seconds=600
dry_run=0
passthrough=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) need_value "$@"; nodes=$2; shift 2 ;;
    --nodes=*) nodes=${1#*=}; shift ;;
    --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
    --gpus-per-node=*) gpus=${1#*=}; shift ;;
    --cpu) cpu=1; shift ;;
    --tasks-per-node | --ntasks-per-node) need_value "$@"; tasks=$2; shift 2 ;;
    --tasks-per-node=* | --ntasks-per-node=*) tasks=${1#*=}; shift ;;
    --cpus-per-task) need_value "$@"; cpus_per_task=$2; shift 2 ;;
    --cpus-per-task=*) cpus_per_task=${1#*=}; shift ;;
    --partition) need_value "$@"; partition=$2; shift 2 ;;
    --partition=*) partition=${1#*=}; shift ;;
    --time) need_value "$@"; time_limit=$2; shift 2 ;;
    --time=*) time_limit=${1#*=}; shift ;;
    --eval-time) need_value "$@"; eval_time=$2; shift 2 ;;
    --eval-time=*) eval_time=${1#*=}; shift ;;
    --eval-nodes) need_value "$@"; eval_nodes=$2; shift 2 ;;
    --eval-nodes=*) eval_nodes=${1#*=}; shift ;;
    --signal-seconds) need_value "$@"; signal_seconds=$2; shift 2 ;;
    --signal-seconds=*) signal_seconds=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    --*) passthrough+=("$1"); shift ;;
    -*) die "unknown option $1 (pass sbatch options in their long --name=value form)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
config=$1
shift
overrides=("$@")
[[ -f "$config" ]] || die "config file $config does not exist"
for n in "$nodes" "$gpus" "$eval_nodes" "$signal_seconds" ${tasks:+"$tasks"} ${cpus_per_task:+"$cpus_per_task"}; do
  [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "expected a positive integer, got '$n'"
done
# Slurm time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> seconds (empty when not one of them).
to_seconds() {
  local t=$1 d=0 h=0 m=0 s=0 a b c
  [[ $t =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || return 0
  if [[ $t == *-* ]]; then
    d=${t%%-*}
    IFS=: read -r h m s <<<"${t#*-}"
  else
    IFS=: read -r a b c <<<"$t"
    if [[ -n $c ]]; then h=$a m=$b s=$c; elif [[ -n $b ]]; then m=$a s=$b; else m=$a; fi
  fi
  echo $(((((10#$d * 24 + 10#${h:-0}) * 60) + 10#${m:-0}) * 60 + 10#${s:-0}))
}
limit=$(to_seconds "$time_limit")
if [[ -n "$limit" && $signal_seconds -ge $limit ]]; then
  die "--signal-seconds $signal_seconds is not shorter than --time $time_limit ($limit s): the job would be" \
    "told to checkpoint and requeue as soon as it starts; pass a smaller --signal-seconds"
fi
for o in ${overrides[@]+"${overrides[@]}"}; do
  [[ $o == *=* ]] || die "override '$o' is not key=value"
done

# ---- the config as the trainer resolves it ---------------------------------------------------------
python=${UNMIX_PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -n "${UNMIX_VENV:-}" ]]; then python=$UNMIX_VENV/bin/python; else python=python3; fi
fi
device_overrides=()
[[ $cpu -eq 1 ]] && device_overrides=("data.device=cpu")
resolved=$("$python" "$here/resolve_config.py" "$config" ${device_overrides[@]+"${device_overrides[@]}"} \
  ${overrides[@]+"${overrides[@]}"}) || die "$config: not a valid pretraining config (checked with $python)"
value() { sed -n "s/^$1=//p" <<<"$resolved"; }
data_train=$(value data.train)
data_val=$(value data.val)
output_dir=$(value output_dir)
crop=$(value data.crop)
[[ -n "$data_train" ]] || die "data.train is empty in $config (set it or pass data.train=DIR)"
[[ -n "$data_val" ]] || die "data.val is empty in $config (the evaluation needs it; pass data.val=DIR)"
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
# Slurm expands %-patterns in --output (%x, %j) and a backslash turns that off for the whole name: a '%'
# of the directory is written '%%'; a backslash cannot be kept, so it is refused.
[[ $output_dir != *\\* ]] || die "output_dir '$output_dir' holds a backslash, which Slurm log paths cannot hold"
log_dir=${output_dir//%/%%}

# ---- resources -------------------------------------------------------------------------------------
if [[ $cpu -eq 1 ]]; then
  tasks=${tasks:-1}
  gres=()
  eval_device=("device=cpu")
else
  tasks=${tasks:-$gpus}
  gres=("--gpus-per-node=$gpus")
  eval_device=()
  if [[ -z "$cpus_per_task" ]] && command -v sinfo >/dev/null 2>&1; then
    # default: the node's CPUs / its tasks (one per GPU); sinfo's %c is the partition's CPUs per node
    # ("48+" when nodes differ: the smallest)
    node_cpus=$(sinfo -h ${partition:+--partition="$partition"} -o %c 2>/dev/null | head -n 1) || node_cpus=""
    node_cpus=${node_cpus%%[!0-9]*}
    if [[ -n "$node_cpus" ]]; then
      cpus_per_task=$((node_cpus / tasks))
      ((cpus_per_task >= ${UNMIX_MIN_CPUS:-4})) || die "the partition's nodes have $node_cpus CPUs for" \
        "$tasks task(s): fewer than ${UNMIX_MIN_CPUS:-4} per GPU task starves DALI; use fewer tasks per node" \
        "or set UNMIX_MIN_CPUS"
    fi
  fi
fi
common=()
[[ -n "$partition" ]] && common+=("--partition=$partition")
[[ -n "$cpus_per_task" ]] && common+=("--cpus-per-task=$cpus_per_task")
common+=(${gres[@]+"${gres[@]}"} ${passthrough[@]+"${passthrough[@]}"})

pretrain=(sbatch --parsable --nodes="$nodes" --ntasks-per-node="$tasks" --signal="B:USR1@$signal_seconds"
  --output="$log_dir/slurm-%x-%j.out" ${time_limit:+"--time=$time_limit"} "${common[@]}"
  "$here/pretrain.sbatch" "$config" ${device_overrides[@]+"${device_overrides[@]}"}
  ${overrides[@]+"${overrides[@]}"})
# Defaults for the evaluation come first so the user's UNMIX_LINEAR_ARGS/UNMIX_KNN_ARGS win.
eval_defaults=(${eval_device[@]+"${eval_device[@]}"} "data.crop=$crop")
linear_args="${eval_defaults[*]}${UNMIX_LINEAR_ARGS:+ $UNMIX_LINEAR_ARGS}"
knn_args="${eval_defaults[*]}${UNMIX_KNN_ARGS:+ $UNMIX_KNN_ARGS}"
evaluate=(sbatch --parsable --nodes="$eval_nodes" --ntasks-per-node="$tasks" --kill-on-invalid-dep=yes
  --output="$log_dir/slurm-%x-%j.out" ${eval_time:+"--time=$eval_time"} "${common[@]}"
  "$here/linear.sbatch" "$output_dir" "$data_train" "$data_val")

if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${pretrain[@]}"
  echo
  printf 'UNMIX_LINEAR_ARGS=%q UNMIX_KNN_ARGS=%q ' "$linear_args" "$knn_args"
  printf '%q ' "${evaluate[@]:0:1}" "--dependency=afterok:PRETRAIN_JOB" "${evaluate[@]:1}"
  echo
  exit 0
fi

mkdir -p "$output_dir" # Slurm opens the log files there before the job starts
pretrain_id=$("${pretrain[@]}") || die "sbatch of the pretraining failed"
pretrain_id=${pretrain_id%%;*}
eval_id=$(UNMIX_LINEAR_ARGS="$linear_args" UNMIX_KNN_ARGS="$knn_args" \
  "${evaluate[0]}" --dependency="afterok:$pretrain_id" "${evaluate[@]:1}") || {
  echo "submit.sh: sbatch of the evaluation failed; the pretraining job $pretrain_id stays queued" >&2
  exit 1
}
eval_id=${eval_id%%;*}
echo "pretrain job $pretrain_id: $nodes node(s) x $tasks task(s), output_dir $output_dir"
echo "eval job $eval_id: after job $pretrain_id succeeds; Slurm logs in $output_dir"
