#!/usr/bin/env bash
# One task of a CRMN grid on Slurm: K lines of the manifest (--runs-per-gpu K, default 1), lines
# a*K+1 .. a*K+K for array index a, each one (row, seed) run, all K at once on the task's GPU.
# Submitted as a job array by crmn/launch/slurm.py:
#     sbatch --array=0-(ceil(M/K)-1)%P ... task.sh MANIFEST EXP_DIR MAX_REQUEUES K
#
# Time limit and preemption warnings: Slurm sends SIGUSR1 to this shell (B:) 300 s before the
# end (change with --slurm-args "--signal=B:USR1@SECONDS" or SBATCH_SIGNAL). The trap passes it
# on to every run, each of which finishes its epoch, checkpoints it and exits 3; the task then requeues
# itself (array task only: requeuing SLURM_JOB_ID would requeue the whole array), at most
# MAX_REQUEUES times (SLURM_RESTART_COUNT). The restarted line has --resume and continues from
# the checkpoint; a finished run is a no-op. The log is opened in append mode, so it keeps
# every start of the task; with K > 1 each run appends to its own EXP_DIR/tasks/LINE.out.
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
# Exit codes: 0 done (or requeued), 3 stopped and resumable, 2 a wrong call of this script
# (usage), 1 a fault of its data (a missing manifest line, a line that is not a plain quoted
# command), else the run's own code.
set -uo pipefail

say() { echo "[task ${job:-?}] $(date '+%F %T') $*"; }
if [ "$#" -lt 3 ] || [ "$#" -gt 4 ] || ! [[ ${3:-} =~ ^[0-9]+$ ]] || ! [[ ${4:-1} =~ ^[1-9][0-9]*$ ]] || [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ -z "${SLURM_ARRAY_JOB_ID:-}" ]; then
  echo "usage: sbatch --array=0-(M/K-1) task.sh MANIFEST EXP_DIR MAX_REQUEUES [K] (runs as a task of a job array)" >&2
  exit 2
fi
manifest=$1 exp_dir=$2 max_requeues=$3 k=${4:-1}
job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
restart=${SLURM_RESTART_COUNT:-0}
tasks="$exp_dir/tasks"
first=$((SLURM_ARRAY_TASK_ID * k))

mkdir -p "$tasks"
# data faults: exit 1 and leave that code for status, for each line of the task
data_fault() {
  say "error: $*" >&2
  for ((j = first; j < first + k; j++)); do echo 1 >"$tasks/$j.rc"; done
  exit 1
}
[ -r "$manifest" ] || data_fault "$manifest: cannot read the manifest"
# The lines are read as words by the shell (below), so each must be what the launcher writes
# (Python's shlex.join): bare words of safe characters and single-quoted strings only. Then
# no expansion, substitution or redirection can hide in it: a manifest never runs code.
plain="^([A-Za-z0-9_@%+=:,./-]+|'[^']*'|\"'\"|[ ])*\$"
lines=()
for ((j = first; j < first + k; j++)); do
  line=$(sed -n "$((j + 1))p" "$manifest")
  if [ -z "$line" ]; then
    [ "$j" -gt "$first" ] && break  # the last task of a grid of M lines, M not a multiple of K
    data_fault "$manifest has no line $((j + 1))"
  fi
  [[ $line =~ $plain ]] || data_fault "$manifest line $((j + 1)) is not a plain quoted command line (written by the launcher); refusing to run it"
  lines+=("$line")
done

# as many intra-op threads as CPUs were allocated, shared by the K runs (torch would otherwise
# start one per core of the node, on cores other jobs own); a value the user exported wins
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / k > 0 ? SLURM_CPUS_PER_TASK / k : 1 ))
fi
export CRMN_RUNS_PER_GPU=$k  # recorded in each run's config.json

stopping=0
children=()
on_usr1() {
  stopping=1
  say "SIGUSR1 (time limit or preemption ahead): each run checkpoints its epoch and stops"
  for c in "${children[@]}"; do kill -USR1 "$c" 2>/dev/null || true; done
}
trap on_usr1 USR1

for n in "${!lines[@]}"; do
  j=$((first + n))
  rm -f "$tasks/$j.rc"
  log="$exp_dir/slurm/$job.out"
  [ "$k" = 1 ] || log="$tasks/$j.out"
  printf '{"launcher": "slurm", "job": "%s", "host": "%s", "pid": %d, "restart": %d, "log": "%s"}\n' \
    "$job" "$(hostname)" "$$" "$restart" "$log" >"$tasks/$j.start"
  say "start $((restart + 1)) on $(hostname -s): line $((j + 1)): ${lines[n]}"
  eval "argv=(${lines[n]})"  # the manifest's shell quoting, as a user's shell would read it
  if [ "$k" = 1 ]; then "${argv[@]}" & else "${argv[@]}" >>"$log" 2>&1 & fi
  children+=($!)
done

stopped=0 worst=0
for n in "${!children[@]}"; do
  j=$((first + n)) c=${children[n]}
  while :; do
    wait "$c"
    rc=$?
    # wait returns early (128 + 10) when the trap ran; the run is then still ending its epoch
    if [ "$stopping" = 1 ] && [ "$rc" -gt 128 ] && kill -0 "$c" 2>/dev/null; then
      continue
    fi
    break
  done
  # 3: stopped after a checkpoint; 138 (SIGUSR1) after a stop request: the signal came before
  # the run could install its handler, so nothing of it was lost either
  if [ "$rc" = 3 ] || { [ "$stopping" = 1 ] && [ "$rc" = 138 ]; }; then
    stopped=1 rc=3
  elif [ "$worst" = 0 ]; then
    worst=$rc
  fi
  echo "$rc" >"$tasks/$j.rc"
  say "line $((j + 1)): exit $rc"
done

# a run stopped: requeue the whole task; its finished runs are then no-ops (--resume)
if [ "$stopped" = 1 ]; then
  if [ "$restart" -lt "$max_requeues" ]; then
    say "stopped; requeueing $job (restart $((restart + 1)) of at most $max_requeues)"
    scontrol requeue "$job" && exit 0
    say "error: scontrol requeue $job failed; the runs stay resumable: launch the grid again" >&2
  else
    say "stopped after $restart requeues (the most allowed); launch the grid again to resume" >&2
  fi
  [ "$worst" = 0 ] && exit 3
fi
exit "$worst"
