#!/usr/bin/env bash
# The same pretraining with Un-Mix off and on, for several seeds, in one command: one submit.sh pair
# (pretraining, then its evaluation) per (Un-Mix, seed), all in one MLflow experiment and store, ready
# for `unmix compare`.
#
#   slurm/sweep.sh [--seeds "0 1 2"] [submit.sh options] CONFIG.yaml [key=value ...]
#
# Runs go to OUTPUT_DIR/unmix-{off,on}-seed<S>, where OUTPUT_DIR is the config's output_dir (after the
# overrides); the trainer's default MLflow store is then OUTPUT_DIR/mlflow.db, shared by the whole sweep
# (with many concurrent jobs prefer an MLflow server: export MLFLOW_TRACKING_URI=http://host:5000).
# Every option other than --seeds goes to submit.sh unchanged (see slurm/submit.sh --help). Prints one
# "pretrain job"/"eval job" pair per run and, last, the `unmix compare` command.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() {
  echo "sweep.sh: $*" >&2
  exit 2
}

seeds="0"
opts=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --seeds) [[ $# -ge 2 ]] || die "--seeds needs a value"; seeds=$2; shift 2 ;;
    --seeds=*) seeds=${1#*=}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --cpu | --dry-run) opts+=("$1"); shift ;;
    --*=*) opts+=("$1"); shift ;;
    --nodes | --gpus-per-node | --tasks-per-node | --ntasks-per-node | --cpus-per-task | --partition | --time | \
      --eval-time | --eval-nodes | --signal-seconds)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      opts+=("$1" "$2")
      shift 2
      ;;
    --) shift; break ;;
    --*) opts+=("$1"); shift ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "usage: sweep.sh [--seeds \"0 1 2\"] [submit.sh options] CONFIG.yaml [key=value ...]"
config=$1
shift
for s in $seeds; do [[ $s =~ ^[0-9]+$ ]] || die "--seeds: '$s' is not a non-negative integer"; done

python=${UNMIX_PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -n "${UNMIX_VENV:-}" ]]; then python=$UNMIX_VENV/bin/python; else python=python3; fi
fi
cpu_override=()
for o in ${opts[@]+"${opts[@]}"}; do [[ $o == --cpu ]] && cpu_override=("data.device=cpu"); done
resolved=$("$python" "$here/resolve_config.py" "$config" ${cpu_override[@]+"${cpu_override[@]}"} "$@") ||
  die "$config: not a valid pretraining config (checked with $python)"
base=$(sed -n 's/^output_dir=//p' <<<"$resolved")
experiment=$(sed -n 's/^mlflow\.experiment=//p' <<<"$resolved")
# Each run's default MLflow store is <its output_dir's parent>/mlflow.db = $base/mlflow.db: one store.
uri=$(sed -n 's/^mlflow\.tracking_uri=//p' <<<"$resolved")
if [[ $(sed -n 's/^mlflow\.tracking_uri_from=//p' <<<"$resolved") == default ]]; then
  uri="sqlite:///$base/mlflow.db"
fi

for seed in $seeds; do
  for unmix in off on; do
    enabled=false
    [[ $unmix == on ]] && enabled=true
    echo "== unmix $unmix, seed $seed"
    "$here/submit.sh" ${opts[@]+"${opts[@]}"} "$config" "$@" \
      "unmix.enabled=$enabled" "seed=$seed" "output_dir=$base/unmix-$unmix-seed$seed"
  done
done
# Every piece quoted for the shell (printf %q): names and paths come from the config, and pasting the
# command must never run a piece of them.
printf 'compare when done: unmix compare --tracking-uri %q --experiment %q\n' "$uri" "$experiment"
