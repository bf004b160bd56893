#!/usr/bin/env bash
# One task of a CRMN grid on Slurm: line SLURM_ARRAY_TASK_ID + 1 of the manifest, i.e. one
# (row, seed) run. Submitted as a job array by crmn/launch/slurm.py:
#     sbatch --array=0-(M-1)%K ... task.sh MANIFEST EXP_DIR MAX_REQUEUES
#
# Time limit and preemption warnings: Slurm sends SIGUSR1 to this shell (B:) 300 s before the
# end (change with --slurm-args "--signal=B:USR1@SECONDS" or SBATCH_SIGNAL). The trap passes it
# on to the run, which finishes its epoch, checkpoints it and exits 3; the task then requeues
# itself (array task only: requeuing SLURM_JOB_ID would requeue the whole array), at most
# MAX_REQUEUES times (SLURM_RESTART_COUNT). The restarted line has --resume and continues from
# the checkpoint; a finished run is a no-op. The log is opened in append mode, so it keeps
# every start of the task.
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
# Exit codes: 0 done (or requeued), 3 stopped and resumable, 2 a wrong call of this script
# (usage), 1 a fault of its data (a missing manifest line, a line that is not a plain quoted
# command), else the run's own code.
set -uo pipefail

say() { echo "[task ${job:-?}] $(date '+%F %T') $*"; }
if [ "$#" -ne 3 ] || ! [[ ${3:-} =~ ^[0-9]+$ ]] || [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || [ -z "${SLURM_ARRAY_JOB_ID:-}" ]; then
  echo "usage: sbatch --array=0-(M-1) task.sh MANIFEST EXP_DIR MAX_REQUEUES (runs as a task of a job array)" >&2
  exit 2
fi
manifest=$1 exp_dir=$2 max_requeues=$3
i=$SLURM_ARRAY_TASK_ID
job="${SLURM_ARRAY_JOB_ID}_${i}"
restart=${SLURM_RESTART_COUNT:-0}
tasks="$exp_dir/tasks"

mkdir -p "$tasks"
rm -f "$tasks/$i.rc"
# data faults: exit 1 and leave that code for status
data_fault() {
  say "error: $*" >&2
  echo 1 >"$tasks/$i.rc"
  exit 1
}
[ -r "$manifest" ] || data_fault "$manifest: cannot read the manifest"
line=$(sed -n "$((i + 1))p" "$manifest")
[ -n "$line" ] || data_fault "$manifest has no line $((i + 1))"
# The line is read as words by the shell (below), so it must be what the launcher writes
# (Python's shlex.join): bare words of safe characters and single-quoted strings only. Then
# no expansion, substitution or redirection can hide in it: a manifest never runs code.
plain="^([A-Za-z0-9_@%+=:,./-]+|'[^']*'|\"'\"|[ ])*\$"
[[ $line =~ $plain ]] || data_fault "$manifest line $((i + 1)) is not a plain quoted command line (written by the launcher); refusing to run it"
printf '{"launcher": "slurm", "job": "%s", "host": "%s", "pid": %d, "restart": %d, "log": "%s"}\n' \
  "$job" "$(hostname)" "$$" "$restart" "$exp_dir/slurm/$job.out" >"$tasks/$i.start"
say "start $((restart + 1)) on $(hostname -s): $line"

# as many intra-op threads as CPUs were allocated (torch would otherwise start one per core
# of the node, on cores other jobs own); a value the user exported wins
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
fi

stopping=0
child=
on_usr1() {
  stopping=1
  say "SIGUSR1 (time limit or preemption ahead): the run checkpoints its epoch and stops"
  [ -z "$child" ] || kill -USR1 "$child" 2>/dev/null || true
}
trap on_usr1 USR1

eval "argv=($line)"  # the manifest's shell quoting, as a user's shell would read it
"${argv[@]}" &
child=$!
while :; do
  wait "$child"
  rc=$?
  # wait returns early (128 + 10) when the trap ran; the run is then still ending its epoch
  if [ "$stopping" = 1 ] && [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; then
    continue
  fi
  break
done

# 3: stopped after a checkpoint; 138 (SIGUSR1) after a stop request: the signal came before
# the run could install its handler, so nothing of it was lost either
if [ "$rc" = 3 ] || { [ "$stopping" = 1 ] && [ "$rc" = 138 ]; }; then
  echo 3 >"$tasks/$i.rc"
  if [ "$restart" -lt "$max_requeues" ]; then
    say "stopped (exit $rc); requeueing $job (restart $((restart + 1)) of at most $max_requeues)"
    scontrol requeue "$job" && exit 0
    say "error: scontrol requeue $job failed; the run stays resumable: launch the grid again" >&2
  else
    say "stopped (exit $rc) after $restart requeues (the most allowed); launch the grid again to resume" >&2
  fi
  exit 3
fi
echo "$rc" >"$tasks/$i.rc"
say "exit $rc"
exit "$rc"
